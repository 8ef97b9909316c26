"""TFDS builder ``domainbed`` (Gulrajani & Lopez-Paz, 2021): PACS, VLCS and OfficeHome.

Manual download. The builder configs ``domainbed/pacs``, ``domainbed/vlcs`` and
``domainbed/office_home`` read the ImageFolder trees that DomainBed's own download script
(``python -m domainbed.scripts.download``) produces::

    <manual_dir>/PACS/{art_painting,cartoon,photo,sketch}/<class>/*.jpg|png
    <manual_dir>/VLCS/{Caltech101,LabelMe,SUN09,VOC2007}/<class>/*.jpg|png
    <manual_dir>/office_home/{Art,Clipart,Product,Real World}/<class>/*.jpg|png

``manual_dir`` is ``data.manual_dir`` (TFDS's default: ``<data_dir>/downloads/manual``). Folder
names are matched ignoring case and treating spaces like underscores (``Real World`` and
``Real_World`` both work). Every domain folder and every class folder must exist.

Each domain is one TFDS split (``art_painting``, ..., ``real_world``: the folder name in lower
case with underscores) with the features ``image`` (original bytes and size), ``label`` (the
class; names sorted as DomainBed's ``ImageFolder`` sorts them), ``domain`` (the domain index in
the order above) and ``filename`` (the path relative to the dataset folder). How the domains
become train / test / probe splits is decided at load time (see ``samjax.data.load``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from etils import epath
import tensorflow_datasets as tfds

from samjax.data import registry
from samjax.data.builders.common import manual_dir_or_raise

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')

_OFFICE_HOME_CLASSES = (
    'Alarm_Clock', 'Backpack', 'Batteries', 'Bed', 'Bike', 'Bottle', 'Bucket', 'Calculator',
    'Calendar', 'Candles', 'Chair', 'Clipboards', 'Computer', 'Couch', 'Curtains', 'Desk_Lamp',
    'Drill', 'Eraser', 'Exit_Sign', 'Fan', 'File_Cabinet', 'Flipflops', 'Flowers', 'Folder',
    'Fork', 'Glasses', 'Hammer', 'Helmet', 'Kettle', 'Keyboard', 'Knives', 'Lamp_Shade',
    'Laptop', 'Marker', 'Monitor', 'Mop', 'Mouse', 'Mug', 'Notebook', 'Oven', 'Pan',
    'Paper_Clip', 'Pen', 'Pencil', 'Postit_Notes', 'Printer', 'Push_Pin', 'Radio',
    'Refrigerator', 'Ruler', 'Scissors', 'Screwdriver', 'Shelf', 'Sink', 'Sneakers', 'Soda',
    'Speaker', 'Spoon', 'TV', 'Table', 'Telephone', 'ToothBrush', 'Toys', 'Trash_Can', 'Webcam')


@dataclasses.dataclass
class DomainBedConfig(tfds.core.BuilderConfig):
  """One DomainBed dataset.

  Attributes:
    folder: the dataset's folder inside the manual directory.
    domains: the domain folder names, in DomainBed's environment order.
    classes: the class folder names, sorted like ``torchvision.datasets.ImageFolder``.
  """
  folder: str = ''
  domains: tuple[str, ...] = ()
  classes: tuple[str, ...] = ()

  @property
  def split_names(self) -> tuple[str, ...]:
    """TFDS split name of every domain."""
    return tuple(registry.canonical_domain_name(d) for d in self.domains)


PACS = DomainBedConfig(
    name='pacs', description='PACS (Li et al., 2017): 9,991 images, 7 classes, 4 domains.',
    folder='PACS', domains=registry.DOMAINBED_DOMAINS['pacs'],
    classes=('dog', 'elephant', 'giraffe', 'guitar', 'horse', 'house', 'person'))
VLCS = DomainBedConfig(
    name='vlcs', description='VLCS (Fang et al., 2013): 10,729 images, 5 classes, 4 domains.',
    folder='VLCS', domains=registry.DOMAINBED_DOMAINS['vlcs'],
    classes=('bird', 'car', 'chair', 'dog', 'person'))
OFFICE_HOME = DomainBedConfig(
    name='office_home',
    description='OfficeHome (Venkateswara et al., 2017): 15,588 images, 65 classes, 4 domains.',
    folder='office_home', domains=registry.DOMAINBED_DOMAINS['office_home'],
    classes=tuple(sorted(_OFFICE_HOME_CLASSES)))
CONFIGS = {c.name: c for c in (PACS, VLCS, OFFICE_HOME)}


def _manual_download_instructions(config: DomainBedConfig) -> str:
  return (
      f'Put the DomainBed {config.folder} ImageFolder tree in the manual directory: '
      f'<manual_dir>/{config.folder}/<domain>/<class>/*.jpg|png with the domain folders '
      f'{list(config.domains)} and in each the class folders {list(config.classes)} '
      '(`python -m domainbed.scripts.download` in https://github.com/facebookresearch/DomainBed '
      'produces it).')


def _subfolders_by_canonical_name(folder: epath.Path) -> dict[str, epath.Path]:
  return {registry.canonical_domain_name(p.name): p for p in folder.iterdir() if p.is_dir()}


def find_domain_class_folders(
    manual_dir: epath.Path, config: DomainBedConfig) -> dict[str, dict[str, epath.Path]]:
  """``{domain: {class: folder}}`` for every domain and class of ``config``.

  Raises:
    ValueError: naming the exact folders that are missing.
  """
  root = manual_dir / config.folder
  instructions = _manual_download_instructions(config)
  if not root.is_dir():
    raise ValueError(f'DomainBed {config.name}: the folder {root} does not exist. {instructions}')
  domain_folders = _subfolders_by_canonical_name(root)
  missing = [d for d in config.domains if registry.canonical_domain_name(d) not in domain_folders]
  if missing:
    raise ValueError(
        f'DomainBed {config.name}: {root} lacks the domain folders {missing}. {instructions}')
  tree = {}
  for domain in config.domains:
    domain_folder = domain_folders[registry.canonical_domain_name(domain)]
    class_folders = _subfolders_by_canonical_name(domain_folder)
    missing = [c for c in config.classes if registry.canonical_domain_name(c) not in class_folders]
    if missing:
      raise ValueError(
          f'DomainBed {config.name}: {domain_folder} lacks the class folders {missing}. '
          f'{instructions}')
    tree[domain] = {c: class_folders[registry.canonical_domain_name(c)] for c in config.classes}
  return tree


def list_images(folder: epath.Path) -> list[epath.Path]:
  """Image files directly in ``folder``, sorted by name."""
  return sorted(
      (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()),
      key=lambda p: p.name)


class DomainBed(tfds.core.GeneratorBasedBuilder):
  """DomainBed's PACS, VLCS and OfficeHome: one split per domain, label = class."""

  name = 'domainbed'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [PACS, VLCS, OFFICE_HOME]
  MANUAL_DOWNLOAD_INSTRUCTIONS = '\n'.join(
      _manual_download_instructions(c) for c in BUILDER_CONFIGS)

  def _info(self) -> tfds.core.DatasetInfo:
    config: DomainBedConfig = self.builder_config
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Original bytes (JPEG or PNG); decoded to RGB.
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=config.classes),
            'domain': tfds.features.ClassLabel(names=config.split_names),
            'filename': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/facebookresearch/DomainBed',
        citation="""@inproceedings{gulrajani2021search,
  title={In Search of Lost Domain Generalization},
  author={Gulrajani, Ishaan and Lopez-Paz, David},
  booktitle={International Conference on Learning Representations},
  year={2021}}""",
        description=__doc__,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: DomainBedConfig = self.builder_config
    manual_dir = manual_dir_or_raise(dl_manager, _manual_download_instructions(config))
    tree = find_domain_class_folders(manual_dir, config)
    root = manual_dir / config.folder
    generators = {}
    for domain_index, (domain, split) in enumerate(zip(config.domains, config.split_names)):
      files = [(label, path) for label, cls in enumerate(config.classes)
               for path in list_images(tree[domain][cls])]
      if not files:
        raise ValueError(
            f'DomainBed {config.name}: no images (*.jpg, *.jpeg, *.png) under '
            f'{root / domain}/<class>/. {_manual_download_instructions(config)}')
      generators[split] = self._generate_examples(root, domain_index, files)
    return generators

  def _generate_examples(self, root: epath.Path, domain_index: int,
                         files: list[tuple[int, epath.Path]]) -> Iterator:
    for label, path in files:
      relative = str(path.relative_to(root))  # epath: also under gs://
      yield relative, {
          'image': os.fspath(path),
          'label': label,
          'domain': domain_index,
          'filename': relative,
      }
