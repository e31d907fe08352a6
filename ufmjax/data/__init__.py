"""Data the models are trained and steered on; generated here or shipped with Python.

- `concepts`: the concept dataset of Assumption 1 (docs/theory.md, Sec. 2): V tokens in G
  concepts, contexts, the exact table p(z|c_j), steering sets P and N.
- `text`: a character corpus built from Python's bundled documentation, with character
  classes as concepts.
"""

from ufmjax.data.concepts import (
    PROFILE_TOL,
    ConceptData,
    DataConfig,
    check_steering_sets,
    dirichlet_config,
    reference_config,
    select_steering_sets,
)
from ufmjax.data.text import CLASSES, TextConfig, TextCorpus, char_class, concept_index, steering_prompts

# What a GPT trains on: the concept dataset, or the characters of Python's bundled docs.
CORPORA = ("concept", "text")

__all__ = [
    "CLASSES", "CORPORA", "PROFILE_TOL", "ConceptData", "DataConfig", "TextConfig", "TextCorpus", "char_class",
    "check_steering_sets", "concept_index", "dirichlet_config", "reference_config", "select_steering_sets",
    "steering_prompts",
]
