"""Synthetic abdominal CT phantoms: UniMOS's embedded default data (no download needed).

A phantom is described in millimetres in an *anatomy frame* whose axes are the LPS axes (x towards
the patient's left, y posterior, z superior) and whose origin lies on the body axis at the height of
the liver dome. It is painted on the canonical LPS grid of :mod:`data.volume` (array ``[S, P, L]``),
then stored the way the real dataset stores its files (axis flips / permutation with the matching
direction matrix and origin), so ``to_canonical(read_volume(file))`` gives back the same anatomy.

Anatomy: body ellipse with subcutaneous fat and a muscle wall; in the abdominal cavity bowel with
mesenteric fat and gas, lung bases, liver (two lobes), gallbladder, stomach with a gas cap, pancreas,
spleen, two kidneys with sinus fat, aorta, IVC, psoas and paraspinal muscles, vertebrae with discs.
Organs are deformed ellipsoids (low-order harmonic radius modulation plus a smooth random bump
field); positions, sizes and HU values are drawn per case; liver and spleen have similar HU, so a
model has to learn shape and position. HU values follow the portal venous phase that LiTS, KiTS and
MSD Spleen were mostly acquired in (enhancing parenchyma ~100-130 HU, kidneys brighter, hypodense
tumours); a non-contrast liver/spleen would sit within noise of the abdominal wall muscle, which no
real training set of these organs looks like.

Speed: structures are painted at most ``BASE_SIZE`` voxels across in-plane and only inside their
bounding boxes; intensities (with noise, so the noise comes out correlated) are upsampled linearly
and the tissue map by repetition, so label maps stay nearest neighbour.

Determinism: every case draws from ``np.random.default_rng([seed, dataset code, case number])``;
no global random state.
"""

# The package splits the generator along its jobs (issue 16); `from data.phantom import ...` keeps
# working for synth.py, bench/ and the tests.
from data.phantom.anatomy import (
    draw_anatomy,
)
from data.phantom.render import (
    Grid,
    PhantomSpec,
    make_phantom,
    rasterize,
)
from data.phantom.shapes import (
    Anatomy,
    Blob,
    Column,
    FieldRegion,
    Paint,
    Shape,
    SmoothField,
)
from data.phantom.tissues import (
    BASE_SIZE,
    DATASET_STYLES,
    MARKER,
    MAX_DEFORM,
    ORGAN_TISSUES,
    PADDING_HU,
    TISSUE_ID,
    TISSUES,
    DatasetStyle,
    Tissue,
    dataset_labels,
    label_lut,
)
from data.phantom.writer import (
    case_numbers,
    case_rng,
    describe,
    draw_spec,
    make_case,
    synthesize,
    write_dataset,
)

__all__ = [
    "Anatomy",
    "BASE_SIZE",
    "Blob",
    "Column",
    "DATASET_STYLES",
    "DatasetStyle",
    "FieldRegion",
    "Grid",
    "MARKER",
    "MAX_DEFORM",
    "ORGAN_TISSUES",
    "PADDING_HU",
    "Paint",
    "PhantomSpec",
    "Shape",
    "SmoothField",
    "TISSUES",
    "TISSUE_ID",
    "Tissue",
    "case_numbers",
    "case_rng",
    "dataset_labels",
    "describe",
    "draw_anatomy",
    "draw_spec",
    "label_lut",
    "make_case",
    "make_phantom",
    "rasterize",
    "synthesize",
    "write_dataset",
]
