"""Built-in datasets as data files, and the code that reads, tokenises and validates them."""

from mechkit.data.probe_dataset import ProbeDataset
from mechkit.data.relations import CATEGORIES, Relation, builtin_relations, load_relation_file

__all__ = ["CATEGORIES", "ProbeDataset", "Relation", "builtin_relations", "load_relation_file"]
