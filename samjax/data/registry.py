"""The data sets samjax knows and the rules between data fields (numpy-free, TensorFlow-free).

The config schema (:mod:`samjax.config`) reads its choices and cross-field rules from here, the
TFDS builders and the loader read the same names: the data layer never imports the schema.
"""

from __future__ import annotations

from typing import Any, Mapping

DATASETS = ('digits_dominoes', 'cifar_mnist', 'fmnist_mnist', 'celeb_a', 'waterbirds', 'domainbed')
NORMALIZATIONS = ('mean_pixel', 'imagenet', 'none')
PLACEMENTS = ('auto', 'device', 'host')

# DomainBed's data sets and their domain folders, in DomainBed's environment order.
DOMAINBED_DOMAINS = {
    'pacs': ('art_painting', 'cartoon', 'photo', 'sketch'),
    'vlcs': ('Caltech101', 'LabelMe', 'SUN09', 'VOC2007'),
    'office_home': ('Art', 'Clipart', 'Product', 'Real World'),
}
DOMAINBED_DATASETS = tuple(DOMAINBED_DOMAINS)


def canonical_domain_name(name: str) -> str:
  """Folder names compare in lower case with spaces as underscores: 'Real World' -> 'real_world'."""
  return name.strip().lower().replace(' ', '_')


def domain_split_names(domainbed_dataset: str) -> tuple[str, ...]:
  """The TFDS split name of every domain of a DomainBed data set."""
  return tuple(canonical_domain_name(d) for d in DOMAINBED_DOMAINS[domainbed_dataset])


def rule_violations(data: Mapping[str, Any]) -> list[tuple[str, str]]:
  """``(field, message)`` of every rule between the ``data`` fields that ``data`` breaks.

  ``data`` holds every data field (each already valid alone); ``field`` is dotted from the config
  root, e.g. ``'data.held_out_domain'``.
  """
  violations = []
  if data['name'] == 'domainbed':
    domains = domain_split_names(data['domainbed_dataset'])
    held_out = data['held_out_domain']
    if not isinstance(held_out, str) or canonical_domain_name(held_out) not in domains:
      violations.append(('data.held_out_domain', f'must be one of {", ".join(domains)} for '
                         f'{data["domainbed_dataset"]}, got {held_out!r}.'))
  return violations
