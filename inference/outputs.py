"""Files in, files out: which output file each input of ``segment.py`` is written to."""

from __future__ import annotations

from pathlib import Path

from utils.errors import InputError


def plan_outputs(input_path: str | Path, output_path: str | Path) -> list[tuple[Path, Path]]:
    """Pair every input volume with its output file.

    * a volume file -> ``output`` (a volume file name), or ``output/<input name>`` when ``output``
      is an existing folder;
    * a folder of volume files -> ``output/<same names>`` (``output`` is a folder);
    * a DICOM series folder -> ``output`` (``.nii.gz`` file), or ``output/<folder>.nii.gz``.

    Raises:
        InputError: missing input, empty folder, output that would overwrite an input, two inputs
            with one output name (``a.mhd`` and ``a.mha``), or an output name without a volume suffix
            or with ``.mhd`` (written as two files, not atomically).
    """
    from data.volume import VOLUME_SUFFIXES, output_name
    from data.volume_writer import MHD_OUTPUT
    from inference.evaluation import list_volume_files
    from utils.fileio import check_distinct_outputs

    src, dst = Path(input_path), Path(output_path)
    if not src.exists():
        raise InputError(src, "input does not exist")

    def as_file(name: str) -> Path:
        if dst.is_dir():
            return dst / name
        if not dst.name.lower().endswith(VOLUME_SUFFIXES):
            raise InputError(dst, "output must be a volume file (.nii.gz, .nii, .mha, .nrrd) or an "
                             "existing folder")
        if dst.name.lower().endswith(".mhd"):
            raise InputError(dst, MHD_OUTPUT)  # refused before any work, not after the first volume
        return dst

    if src.is_file():
        out = as_file(output_name(src.name))
        if out.resolve() == src.resolve():
            raise InputError(out, "output would overwrite the input")
        return [(src, out)]
    files = list_volume_files(src)
    if not files:  # a DICOM series folder (read_geometry says so when it is not)
        return [(src, as_file(src.name + ".nii.gz"))]
    if dst.exists() and not dst.is_dir():
        raise InputError(dst, "input is a folder of volumes, so the output must be a folder")
    if dst.resolve() == src.resolve():
        raise InputError(dst, "output folder must differ from the input folder")
    jobs = [(f, dst / output_name(f.name)) for f in files]
    check_distinct_outputs(jobs)
    return jobs


__all__ = ["plan_outputs"]
