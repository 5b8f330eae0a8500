"""One matplotlib function per figure kind, all in one shared style (``viz/style.py``)."""

from mechkit.viz.attribution import component_share_figure, task_grid_figure
from mechkit.viz.heads import category_map_figure, relation_scores_figure
from mechkit.viz.probing import layer_probe_figure, position_probe_figure
from mechkit.viz.style import save

__all__ = ["category_map_figure", "component_share_figure", "layer_probe_figure", "position_probe_figure",
           "relation_scores_figure", "save", "task_grid_figure"]
