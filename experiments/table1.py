"""Table 1: SGD vs SAM linear-probe error of the easy and the hard feature.

  python -m experiments.table1 --out=runs/table1                       # the paper's grids
  python -m experiments.table1 --out=runs/table1 --datasets=digits_dominoes --budget=tiny

The paper's grids (PAPER.md): CIFAR-MNIST / FMNIST-MNIST lr {0.01, 0.05, 0.1} x rho {0, .01,
.03, .05, .07, .1, .2}; CelebA / Waterbirds lr {5e-4, 1e-3, 5e-3, 1e-2} x rho {0, .01, .02, .05,
.07}; four seeds; selection on validation error. The paper's Table 1 numbers were lost in
extraction; its claim is SAM < SGD on both probes for all four data sets, which the table states
per row. ``--budget=tiny`` shrinks the grid and the steps so that it runs on a CPU in minutes.

The embedded study (no download; :mod:`embedded`, docs/real_data.md): SAM (and LSAM) minus SGD
paired by seed at equal learning rate on ``digits_textures``, with a pre-registered primary
endpoint (configs/digits_textures_study.py), written to ``OUT/table1.json`` and
``OUT/table1_embedded.md``:

  python -m experiments.table1 --embedded --out=runs/embedded                  # CPU budget
  python -m experiments.table1 --embedded --budget=paper --out=runs/paper      # accelerator
  python -m experiments.table1 --embedded --vmap --out=runs/embedded   # a method's grid vmapped

Any grid spreads over machines with ``--shard=i/n`` (0 <= i < n): each invocation runs the i-th
interleaved slice, and the slice that completes the grid in ``--out`` (or ``--merge``) writes
the tables, e.g. a SLURM array ``#SBATCH --array=0-7`` with
``--shard=$SLURM_ARRAY_TASK_ID/8``.
"""

from __future__ import annotations

from absl import app, flags
from etils import epath

from experiments import sweep

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'runs/table1', 'Output folder (run workdirs and tables).')
flags.DEFINE_list('datasets', ['cifar_mnist', 'fmnist_mnist', 'celeba', 'waterbirds'],
                  'Config names (configs/NAME.py).')
flags.DEFINE_enum('budget', None, ['paper', 'cpu', 'tiny'],
                  'paper: full grids (default; --embedded: the paper\'s net and steps, for an '
                  'accelerator); cpu: the embedded study on 2 CPU cores (--embedded\'s default); '
                  'tiny: a CPU smoke run.')
flags.DEFINE_integer('num_seeds', None, 'Override the number of seeds.')
flags.DEFINE_string('data_dir', '', 'TFDS data_dir for every run.')
flags.DEFINE_string('manual_dir', '', 'Manual download folder (Waterbirds).')
flags.DEFINE_string('init_checkpoint', '', 'torchvision ResNet-18 weights for the ResNet runs.')
flags.DEFINE_bool('embedded', False, 'Run the embedded digits_textures study instead.')
flags.DEFINE_bool('vmap', False,
                  'Embedded study: train each method\'s grid as one vmapped program.')
flags.DEFINE_string('shard', '0/1', 'i/n: run only the i-th of n interleaved slices of the grid.')
flags.DEFINE_bool('merge', False, 'Train nothing: merge the finished slices into the tables.')

GRIDS = {
    'cifar_mnist': ([0.01, 0.05, 0.1], [0.0, 0.01, 0.03, 0.05, 0.07, 0.1, 0.2]),
    'fmnist_mnist': ([0.01, 0.05, 0.1], [0.0, 0.01, 0.03, 0.05, 0.07, 0.1, 0.2]),
    'celeba': ([5e-4, 1e-3, 5e-3, 1e-2], [0.0, 0.01, 0.02, 0.05, 0.07]),
    'waterbirds': ([5e-4, 1e-3, 5e-3, 1e-2], [0.0, 0.01, 0.02, 0.05, 0.07]),
    'digits_dominoes': ([0.01, 0.05, 0.1], [0.0, 0.02, 0.05, 0.1]),
}
TINY = {'learning_rates': 1, 'rhos': [0.0, 0.05], 'seeds': 2, 'num_train_steps': 16,
        'batch_size': 16, 'max_train_examples': 256}
METRICS = ('easy_probe_error', 'hard_probe_error', 'test_error')


def build_runs(datasets, budget: str, num_seeds=None):
  runs = []
  for name in datasets:
    if name not in GRIDS:
      sweep.usage_error(f'--datasets: unknown {name!r}; choose from {", ".join(GRIDS)}.')
    lrs, rhos = GRIDS[name]
    seeds = num_seeds or 4
    if budget == 'tiny':
      lrs, rhos, seeds = lrs[1:1 + TINY['learning_rates']], TINY['rhos'], num_seeds or TINY['seeds']
    runs += sweep.grid(name, f'configs/{name}.py', None, lrs, rhos, range(seeds))
  return runs


def overrides(budget: str) -> dict:
  result = {'progress_bar': False}
  if FLAGS.data_dir:
    result['data.data_dir'] = FLAGS.data_dir
  if FLAGS.manual_dir:
    result['data.manual_dir'] = FLAGS.manual_dir
  if FLAGS.init_checkpoint:
    result['model.init_checkpoint'] = FLAGS.init_checkpoint
  if budget == 'tiny':
    result.update({'num_train_steps': TINY['num_train_steps'], 'batch_size': TINY['batch_size'],
                   'eval_batch_size': 64, 'data.max_train_examples': TINY['max_train_examples'],
                   'checkpoint_every_steps': 0,
                   'model.name': 'convnet'})  # a CPU smoke run: skip ResNet-18's compile time
  return result


def main(argv):
  del argv
  try:
    shard = sweep.parse_shard(FLAGS.shard)
  except ValueError as error:
    sweep.usage_error(str(error))
  if FLAGS.num_seeds is not None and FLAGS.num_seeds < (2 if FLAGS.embedded else 1):
    sweep.usage_error(f'--num_seeds={FLAGS.num_seeds}: need at least '
                      f'{2 if FLAGS.embedded else 1} (the embedded study\'s intervals need 2).')
  if FLAGS.embedded:
    from experiments import embedded  # pylint: disable=g-import-not-at-top
    embedded.run_study(FLAGS.out, shard, FLAGS.merge, FLAGS.budget or 'cpu', FLAGS.num_seeds,
                       FLAGS.data_dir or None, FLAGS.vmap)
    return
  budget = FLAGS.budget or 'paper'
  if budget == 'cpu':
    sweep.usage_error('--budget=cpu is the embedded study\'s budget: add --embedded, or use '
                      '--budget=paper|tiny.')
  if FLAGS.vmap:
    sweep.usage_error('--vmap trains the embedded study\'s grid in one program: add --embedded.')
  runs = build_runs(FLAGS.datasets, budget, FLAGS.num_seeds)
  records = sweep.run_shard_and_merge(runs, FLAGS.out, overrides(budget), FLAGS.shard,
                                      FLAGS.merge)
  if records is None:
    return
  rows = sweep.select_and_aggregate(records, METRICS)
  text = sweep.write_table(rows, METRICS, FLAGS.out, 'table1',
                           title='Table 1: probe error (mean +- std over seeds; lower is better)',
                           footer=[line for metric in METRICS[:2]
                                   for line in sweep.verdicts(rows, metric)])
  sweep.plot_table(rows, METRICS[:2], str(epath.Path(FLAGS.out) / 'table1.png'), 'probe error')
  print(text)


if __name__ == '__main__':
  app.run(main)
