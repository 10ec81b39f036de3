"""Example tasks shipped with the package, usable from any directory:

- ``swarm.examples.digits:task`` (and ``:diloco``): a small CNN on scikit-learn's digits (what ``swarm
  demo`` trains; needs the demo extras: ``pip install 'swarm-training[demo]'``);
- ``swarm.examples.charlm:task`` (and ``:diloco``): a byte-level transformer on text files;
- ``python -m swarm.examples.loopback_ping``: a few ``swarm peer`` processes ping each other.

In a clone of the repository, ``examples/*.py`` are links to these files, so ``swarm join
examples/digits.py`` runs (and pins) the very same code.
"""
