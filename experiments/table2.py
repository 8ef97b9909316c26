"""Table 2: DomainBed linear-probe accuracy on the held-out domain, SGD vs SAM (Appendix F).

  python -m experiments.table2 --out=runs/table2 --manual_dir=/data/domainbed
  python -m experiments.table2 --out=runs/table2 --manual_dir=DIR --datasets=pacs --budget=tiny

Each run trains on three domains and probes the fourth (configs/domainbed.py). The grid is
rho {0, .03, .05, .1} x the learning rates below x four seeds, selected on validation error of
the training domains; the table puts the paper's numbers beside ours. ``--shard=i/n`` runs the
i-th of n interleaved slices of the grid; the slice that completes it (or ``--merge``) writes the
table.
"""

from __future__ import annotations

from absl import app, flags
from etils import epath

from experiments import sweep

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'runs/table2', 'Output folder (run workdirs and tables).')
flags.DEFINE_list('datasets', ['office_home', 'pacs', 'vlcs'], 'DomainBed data sets.')
flags.DEFINE_list('domains', [], 'Held-out domains (default: every domain of each data set).')
flags.DEFINE_enum('budget', 'paper', ['paper', 'tiny'], 'paper: full grid; tiny: a CPU smoke run.')
flags.DEFINE_integer('num_seeds', None, 'Override the number of seeds.')
flags.DEFINE_string('manual_dir', '', 'Folder holding the DomainBed ImageFolder trees.')
flags.DEFINE_string('data_dir', '', 'TFDS data_dir for every run.')
flags.DEFINE_string('init_checkpoint', '', 'torchvision ResNet-18 weights.')
flags.DEFINE_string('shard', '0/1', 'i/n: run only the i-th of n interleaved slices of the grid.')
flags.DEFINE_bool('merge', False, 'Train nothing: merge the finished slices into the table.')

DOMAINS = {
    'office_home': ('Art', 'Clipart', 'Product', 'Real_World'),
    'pacs': ('art_painting', 'cartoon', 'photo', 'sketch'),
    'vlcs': ('Caltech101', 'LabelMe', 'SUN09', 'VOC2007'),
}
LEARNING_RATES = (0.001, 0.005)
RHOS = (0.0, 0.03, 0.05, 0.1)
# PAPER.md, Table 2: probe accuracy on the held-out domain, columns in each data set's domain order.
PAPER = {
    ('office_home', 'sgd'): (.687, .716, .853, .777), ('office_home', 'sam'): (.709, .745, .858, .784),
    ('pacs', 'sgd'): (.910, .897, .955, .893), ('pacs', 'sam'): (.914, .921, .964, .908),
    ('vlcs', 'sgd'): (.993, .736, .748, .812), ('vlcs', 'sam'): (.996, .748, .776, .830),
}
METRICS = ('probe_accuracy',)


def paper_numbers() -> dict:
  return {(f'{name}/{domain}', method): {'probe_accuracy': values[i]}
          for (name, method), values in PAPER.items() for i, domain in enumerate(DOMAINS[name])}


def build_runs(datasets, domains, budget: str, num_seeds=None):
  runs = []
  for name in datasets:
    if name not in DOMAINS:
      sweep.usage_error(f'--datasets: unknown {name!r}; choose from {", ".join(DOMAINS)}.')
    for domain in domains or DOMAINS[name]:
      if domain not in DOMAINS[name]:
        sweep.usage_error(f'--domains: {domain!r} is not a domain of {name}: {DOMAINS[name]}.')
      lrs, rhos, seeds = LEARNING_RATES, RHOS, num_seeds or 4
      if budget == 'tiny':
        lrs, rhos, seeds = LEARNING_RATES[:1], (0.0, 0.05), num_seeds or 2
      runs += sweep.grid(f'{name}/{domain}', 'configs/domainbed.py', f'{name},{domain}',
                         lrs, rhos, range(seeds))
  return runs


def overrides(budget: str) -> dict:
  result = {'progress_bar': False}
  for flag, key in (('manual_dir', 'data.manual_dir'), ('data_dir', 'data.data_dir'),
                    ('init_checkpoint', 'model.init_checkpoint')):
    if getattr(FLAGS, flag):
      result[key] = getattr(FLAGS, flag)
  if budget == 'tiny':
    result.update({'num_train_steps': 8, 'batch_size': 16, 'eval_batch_size': 32,
                   'data.image_size': 32, 'checkpoint_every_steps': 0,
                   'model.name': 'convnet'})  # a CPU smoke run: skip ResNet-18's compile time
  return result


def main(argv):
  del argv
  try:
    sweep.parse_shard(FLAGS.shard)
  except ValueError as error:
    sweep.usage_error(str(error))
  runs = build_runs(FLAGS.datasets, FLAGS.domains, FLAGS.budget, FLAGS.num_seeds)
  records = sweep.run_shard_and_merge(runs, FLAGS.out, overrides(FLAGS.budget), FLAGS.shard,
                                      FLAGS.merge)
  if records is None:
    return
  rows = sweep.select_and_aggregate(records, METRICS)
  text = sweep.write_table(rows, METRICS, FLAGS.out, 'table2', paper=paper_numbers(),
                           title='Table 2: held-out-domain probe accuracy (higher is better)',
                           footer=sweep.verdicts(rows, 'probe_accuracy', higher_is_better=True))
  sweep.plot_table(rows, METRICS, str(epath.Path(FLAGS.out) / 'table2.png'), 'probe accuracy')
  print(text)


if __name__ == '__main__':
  app.run(main)
