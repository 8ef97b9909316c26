"""TFDS builders of the data sets samjax builds itself; importing this package registers them.

* :mod:`~samjax.data.builders.digits_dominoes`: scikit-learn digits, an easy and a hard pair.
* :mod:`~samjax.data.builders.digits_textures`: scikit-learn digits above patches of
  scikit-image's photographs (the embedded study of ``experiments/table1.py --embedded``).
* :mod:`~samjax.data.builders.stacked`: CIFAR-MNIST and FMNIST-MNIST from the TFDS catalog.
* :mod:`~samjax.data.builders.waterbirds`, :mod:`~samjax.data.builders.domainbed`: manual
  downloads.
* :mod:`~samjax.data.builders.composition`: the numpy recipes of the stacked data sets.
* :mod:`~samjax.data.builders.common`: helpers the builders share.
"""

from samjax.data.builders import digits_dominoes  # pylint: disable=unused-import
from samjax.data.builders import digits_textures  # pylint: disable=unused-import
from samjax.data.builders import domainbed  # pylint: disable=unused-import
from samjax.data.builders import stacked  # pylint: disable=unused-import
from samjax.data.builders import waterbirds  # pylint: disable=unused-import
