"""TFDS builder ``waterbirds`` (Sagawa et al., 2019), from a manual download.

Waterbirds is not in the TFDS catalog. Place **one** of these in the manual directory
(``data.manual_dir``; TFDS's default is ``<data_dir>/downloads/manual``):

* the tarball ``waterbird_complete95_forest2water2.tar.gz`` (from
  https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz), or
* its extracted folder ``waterbird_complete95_forest2water2/``, holding ``metadata.csv`` and the
  image folders it names (``001.Black_footed_Albatross/...jpg``, ...).

``metadata.csv`` has the columns ``img_id,img_filename,y,split,place,place_filename``:

* ``y``: bird type, 0 = landbird, 1 = waterbird (feature ``bird``);
* ``place``: background, 0 = land, 1 = water (feature ``place``);
* ``split``: 0 = ``train``, 1 = ``validation``, 2 = ``test``.

In ``train`` 95% of the birds are on their own kind of background; ``validation`` and ``test``
have (within each bird type) as many land as water backgrounds. Images keep their original size
and JPEG bytes; resizing happens when the data is loaded.
"""

from __future__ import annotations

import csv
import os
from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from samjax.data.builders.common import manual_dir_or_raise

FOLDER_NAME = 'waterbird_complete95_forest2water2'
TARBALL_NAME = FOLDER_NAME + '.tar.gz'
METADATA_NAME = 'metadata.csv'
METADATA_COLUMNS = ('img_id', 'img_filename', 'y', 'split', 'place')
SPLIT_NAMES = {0: 'train', 1: 'validation', 2: 'test'}

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put either the tarball `{TARBALL_NAME}` (https://nlp.stanford.edu/data/dro/{TARBALL_NAME}) or its
extracted folder `{FOLDER_NAME}/` (with `{METADATA_NAME}` and the image folders it lists) in the
manual directory.
"""


def find_waterbirds_root(dl_manager: tfds.download.DownloadManager) -> epath.Path:
  """The folder holding ``metadata.csv``: the extracted folder, or the tarball extracted by TFDS."""
  manual_dir = manual_dir_or_raise(dl_manager, MANUAL_DOWNLOAD_INSTRUCTIONS)
  folder = manual_dir / FOLDER_NAME
  tarball = manual_dir / TARBALL_NAME
  if (folder / METADATA_NAME).exists():
    return folder
  if tarball.exists():
    extracted = epath.Path(dl_manager.extract(tarball))
    for candidate in (extracted / FOLDER_NAME, extracted):
      if (candidate / METADATA_NAME).exists():
        return candidate
    raise ValueError(
        f'The tarball {tarball} does not contain {FOLDER_NAME}/{METADATA_NAME}. '
        + MANUAL_DOWNLOAD_INSTRUCTIONS)
  raise ValueError(
      f'Waterbirds not found: neither {folder / METADATA_NAME} nor {tarball} exists.\n'
      + MANUAL_DOWNLOAD_INSTRUCTIONS)


def read_metadata(root: epath.Path) -> list[dict[str, str]]:
  """Rows of ``metadata.csv``, checked for the needed columns and for existing image files."""
  path = root / METADATA_NAME
  with path.open() as f:
    rows = list(csv.DictReader(f))
  missing_columns = [c for c in METADATA_COLUMNS if not rows or c not in rows[0]]
  if missing_columns:
    raise ValueError(
        f'{path} lacks the columns {missing_columns}; expected the header '
        'img_id,img_filename,y,split,place,place_filename.')
  missing_files = [r['img_filename'] for r in rows if not (root / r['img_filename']).exists()]
  if missing_files:
    raise ValueError(
        f'{len(missing_files)} image files listed in {path} are missing under {root}, e.g. '
        f'{root / missing_files[0]}. The extracted folder is incomplete: extract '
        f'{TARBALL_NAME} again.')
  return rows


class Waterbirds(tfds.core.GeneratorBasedBuilder):
  """Waterbirds: CUB birds (landbird / waterbird) pasted onto Places backgrounds (land / water)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'bird': tfds.features.ClassLabel(names=['landbird', 'waterbird']),
            'place': tfds.features.ClassLabel(names=['land', 'water']),
            'img_id': tfds.features.Scalar(np.int64),
            'img_filename': tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage='https://github.com/kohpangwei/group_DRO',
        citation="""@inproceedings{sagawa2019distributionally,
  title={Distributionally Robust Neural Networks for Group Shifts: On the Importance of
         Regularization for Worst-Case Generalization},
  author={Sagawa, Shiori and Koh, Pang Wei and Hashimoto, Tatsunori B and Liang, Percy},
  booktitle={International Conference on Learning Representations},
  year={2020}}""",
        description=__doc__,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = find_waterbirds_root(dl_manager)
    rows = read_metadata(root)
    return {
        name: self._generate_examples(root, [r for r in rows if int(r['split']) == code])
        for code, name in SPLIT_NAMES.items()
    }

  def _generate_examples(self, root: epath.Path, rows: list[dict[str, str]]) -> Iterator:
    for row in rows:
      yield int(row['img_id']), {
          'image': os.fspath(root / row['img_filename']),
          'bird': int(row['y']),
          'place': int(row['place']),
          'img_id': int(row['img_id']),
          'img_filename': row['img_filename'],
      }
