"""DomainBed (Appendix F): train on three domains, linear-probe the held-out fourth.

  --config=configs/domainbed.py:pacs,sketch        (dataset, held-out domain[, optimizer])

Datasets and domains: pacs (art_painting, cartoon, photo, sketch), vlcs (Caltech101, LabelMe,
SUN09, VOC2007), office_home (Art, Clipart, Product, Real_World), from their ImageFolder trees in
data.manual_dir. The label is the class, the attribute the domain; probe.json's probe_accuracy is
the held-out domain's test accuracy of a probe trained on its training part (Table 2).
Paper grid: rho {0, .03, .05, .1}.
"""

from samjax.config import base_train_config


def get_config(arg=None):
  parts = [p.strip() for p in (arg or 'pacs,sketch').split(',')]
  if len(parts) not in (2, 3):
    raise ValueError('configs/domainbed.py takes "dataset,held_out_domain[,optimizer]", '
                     f'e.g. pacs,sketch; got {arg!r}.')
  config = base_train_config()
  config.data.name = 'domainbed'
  config.data.domainbed_dataset = parts[0]
  config.data.held_out_domain = parts[1]
  config.data.image_size = 224
  config.data.normalization = 'imagenet'
  config.data.augment = True
  config.model.name = 'resnet18'
  config.optimizer.name = parts[2] if len(parts) == 3 else 'sam'
  config.optimizer.rho = 0.05
  config.optimizer.learning_rate = 0.005
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.batch_size = 96
  config.num_train_steps = 5000
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 50
  return config
