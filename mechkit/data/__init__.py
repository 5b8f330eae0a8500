"""Built-in datasets as data files, and the code that reads, tokenises and validates them."""

from mechkit.data.function_chains import (
    FUNCTIONS,
    SubQuestion,
    function_dataset,
    load_function_chains,
)
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

__all__ = ["CATEGORIES", "FUNCTIONS", "ProbeDataset", "Relation", "SubQuestion", "apply_template", "builtin_relations",
           "function_dataset", "harmful_requests", "harmful_vs_harmless", "harmless_requests", "jailbreak",
           "jailbreak_templates", "load_function_chains", "load_relation_file"]
