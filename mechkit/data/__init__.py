"""Built-in datasets as data files, and the code that reads, tokenises and validates them."""

from mechkit.data.probe_dataset import ProbeDataset
from mechkit.data.relations import (
    CATEGORIES,
    Relation,
    builtin_relations,
    load_relation_file,
)
from mechkit.data.safety import (
    apply_template,
    harmful_requests,
    harmful_vs_harmless,
    harmless_requests,
    jailbreak,
    jailbreak_templates,
)

__all__ = ["CATEGORIES", "ProbeDataset", "Relation", "apply_template", "builtin_relations", "harmful_requests",
           "harmful_vs_harmless", "harmless_requests", "jailbreak", "jailbreak_templates", "load_relation_file"]
