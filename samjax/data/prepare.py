"""Prepares a data set into a TFDS ``data_dir`` (a local path or gs://), once.

  python -m samjax.data.prepare --name=celeb_a --data_dir=gs://bucket/tensorflow_datasets
  python -m samjax.data.prepare --name=waterbirds --data_dir=DIR --manual_dir=DIR_WITH_DOWNLOAD
  python -m samjax.data.prepare --name=domainbed --domainbed_dataset=pacs --data_dir=DIR \\
      --manual_dir=DIR_WITH_PACS

celeb_a, cifar_mnist and fmnist_mnist download from the TFDS catalog's sources; waterbirds and
domainbed build from a manual download (see their builders for the expected layout);
digits_dominoes builds from scikit-learn's digits. Training then reads the prepared data with
``--config.data.data_dir=DIR`` and downloads nothing.

Training prepares an absent data set itself, through the same :func:`prepare_once`: processes
that share a ``data_dir`` (runs of a grid started together, the hosts of a multi-host job) never
prepare it twice. One of them takes the data set's lock in ``<data_dir>/samjax_locks/`` (a
:class:`samjax.claim_lock.ClaimLock`, which works on gs:// too) and prepares; the others wait
until the lock is free, then read. A preparer that dies (killed, its host lost) leaves a stale
claim that the next process takes over.
"""

from __future__ import annotations

import time
from typing import Optional

from absl import app, flags, logging
from etils import epath

from samjax import claim_lock
from samjax import cli as cli_lib
from samjax.data import registry

# The folder of the data sets' locks, beside the data sets in the data_dir (TFDS ignores it).
LOCKS = 'samjax_locks'
# How often a waiting process looks whether the preparer has finished.
POLL_SECONDS = 1.0


def prepare_once(tfds_name: str, data_dir: Optional[str], manual_dir=None, *,
                 poll_seconds: float = POLL_SECONDS):
  """The TFDS builder of ``tfds_name`` in ``data_dir``, prepared by exactly one process.

  Returns at once if the data set is prepared. Otherwise one of the processes that call this
  together prepares it under the data set's lock while the others wait for the lock to be free,
  then read what it prepared.

  Args:
    tfds_name: a TFDS name (``digits_dominoes``, ``domainbed/pacs``).
    data_dir: the TFDS data_dir (local or gs://); None: TFDS's default.
    manual_dir: the manual download; default ``<data_dir>/downloads/manual``.
    poll_seconds: how often a waiting process checks the lock.

  Returns:
    A ``tfds.core.DatasetBuilder`` whose data are prepared.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from samjax.data import builders  # pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  root = epath.Path(builder.data_dir_root)
  lock = claim_lock.ClaimLock(root / LOCKS / tfds_name.replace('/', '--'))
  while True:
    try:
      lock.acquire()
    except claim_lock.Held as held:
      logging.info('waiting for host %s, pid %s, which prepares %s in %s',
                   held.holder.get('host'), held.holder.get('pid'), tfds_name, root)
      while lock.others(remove_stale=False):
        time.sleep(poll_seconds)
      # Free: prepared by the holder, or the holder died before it finished (then take over).
      builder = tfds.builder(tfds_name, data_dir=data_dir)
      if builder.is_prepared():
        return builder
      continue
    try:
      # A fresh builder: one made before another process finished would not read its data.
      builder = tfds.builder(tfds_name, data_dir=data_dir)
      if not builder.is_prepared():
        logging.info('preparing %s in %s', tfds_name, root)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir or root / 'downloads' / 'manual'))
      return builder
    finally:
      lock.release()


PROG = 'samjax.data.prepare'


def _define_flags() -> None:
  """The command's flags, defined only when it runs: importing :func:`prepare_once` defines none
  (experiments define their own ``--data_dir``)."""
  flags.DEFINE_enum('name', None, list(registry.DATASETS), 'The data set.')
  flags.DEFINE_string('data_dir', None, "TFDS data_dir; default: TFDS's own.")
  flags.DEFINE_string('manual_dir', None, 'Manual download (waterbirds, domainbed).')
  flags.DEFINE_enum('domainbed_dataset', 'pacs', list(registry.DOMAINBED_DATASETS),
                    'DomainBed data set.')


def main(argv) -> None:
  cli_lib.no_extra_arguments(PROG, argv)
  values = flags.FLAGS
  if values.name is None:
    cli_lib.fail(PROG, '--name is required')
  name = f'domainbed/{values.domainbed_dataset}' if values.name == 'domainbed' else values.name
  with cli_lib.one_line_errors(PROG):
    builder = prepare_once(name, values.data_dir, values.manual_dir)
  print(f'{name} prepared in {builder.data_dir}')


def cli() -> None:
  """A bad flag or a failure is one line and its exit code (:mod:`samjax.cli`)."""
  _define_flags()
  app.run(main, flags_parser=lambda argv: cli_lib.parse_flags(PROG, argv))


if __name__ == '__main__':
  cli()
