"""Prepares a data set into a TFDS ``data_dir`` (a local path or gs://), once, before training.

  python -m samjax.data.prepare --name=celeb_a --data_dir=gs://bucket/tensorflow_datasets
  python -m samjax.data.prepare --name=waterbirds --data_dir=DIR --manual_dir=DIR_WITH_DOWNLOAD
  python -m samjax.data.prepare --name=domainbed --domainbed_dataset=pacs --data_dir=DIR \\
      --manual_dir=DIR_WITH_PACS

celeb_a, cifar_mnist and fmnist_mnist download from the TFDS catalog's sources; waterbirds and
domainbed build from a manual download (see their builders for the expected layout);
digits_dominoes builds from scikit-learn's digits. Training then reads the prepared data with
``--config.data.data_dir=DIR`` and downloads nothing.
"""

from __future__ import annotations

import sys

from absl import app, flags

from samjax import config as config_lib

_NAME = flags.DEFINE_enum('name', None, list(config_lib.DATASETS), 'The data set.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, "TFDS data_dir; default: TFDS's own.")
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Manual download (waterbirds, domainbed).')
_DOMAINBED = flags.DEFINE_enum('domainbed_dataset', 'pacs', list(config_lib.DOMAINBED_DATASETS),
                               'DomainBed data set.')


def main(argv) -> None:
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from samjax.data import builders  # pylint: disable=g-import-not-at-top,unused-import
  if _NAME.value is None:
    print('samjax.data.prepare: error: --name is required', file=sys.stderr)
    sys.exit(2)
  name = f'domainbed/{_DOMAINBED.value}' if _NAME.value == 'domainbed' else _NAME.value
  builder = tfds.builder(name, data_dir=_DATA_DIR.value)
  manual_dir = _MANUAL_DIR.value or epath.Path(builder.data_dir_root) / 'downloads' / 'manual'
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ValueError as e:
    print(f'samjax.data.prepare: error: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(2)
  print(f'{name} prepared in {builder.data_dir}')


def cli() -> None:
  """A bad flag is one line and exit code 2, not absl's usage text."""
  try:
    argv = flags.FLAGS(sys.argv)
  except flags.Error as e:
    print(f'samjax.data.prepare: error: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(2)
  app.run(main, argv=argv)


if __name__ == '__main__':
  cli()
