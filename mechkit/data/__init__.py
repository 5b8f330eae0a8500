"""Built-in datasets as data files, and the code that reads, tokenises and validates them."""

from mechkit.data.relations import CATEGORIES, Relation, builtin_relations, load_relation_file

__all__ = ["CATEGORIES", "Relation", "builtin_relations", "load_relation_file"]
