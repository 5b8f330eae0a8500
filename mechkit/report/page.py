"""The report's ``index.html``: every figure with its caption, the notes each analysis wrote,
the settings, versions and timings. One self-contained page (relative links, no scripts, no
network) that opens from the folder in any browser."""

from __future__ import annotations

import json
from html import escape

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.92rem; color: #333; max-width: 60rem; }
.notes { font-family: ui-monospace, monospace; font-size: 0.82rem; background: #f7f7f7; padding: 0.6rem 1rem;
         white-space: pre-wrap; }
.warn { color: #a33; } table { border-collapse: collapse; font-size: 0.88rem; }
td, th { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
nav a { margin-right: 0.8rem; } .muted { color: #777; }
"""

HOW_TO_READ = {
    "layer-probes": "Where along the depth of each model a linear probe can read whether a statement is true.",
    "jailbreak-probes": "Where a probe tells jailbreak prompts from benign ones, and whether removing the refusal "
                        "direction from the weights (abliteration) changes that.",
    "position-probes": "At which layer and token position a label becomes decodable (by default: whether the "
                       "model's own answer to a question is correct, with the exact answer's tokens located in it).",
    "head-classification": "Which heads implement which relation, read from the weights alone.",
    "head-attribution": "Which heads matter for each task (larger |value| = more effect on the answer).",
    "function-heads": "Which heads a probe relies on to tell cognitive functions apart, and what removing them does.",
    "component-attribution": "How each layer's effect splits over attention q/k/v/o and MLP up/down/gate.",
}


def _figure(figure: dict) -> str:
    problems = "".join(f'<div class="warn">Readability check: {escape(p)}</div>' for p in figure.get("problems", []))
    return (f'<figure><a href="{escape(figure["svg"])}"><img src="{escape(figure["png"])}" '
            f'alt="{escape(figure["caption"][:160])}"></a>'
            f'<figcaption>{escape(figure["caption"])} <a href="{escape(figure["svg"])}">SVG</a></figcaption>'
            f'{problems}</figure>')


def index_html(manifest: dict) -> str:
    """The page for a finished run's ``report.json`` contents."""
    from mechkit.report.analyses import ANALYSES, display_name

    sections, nav = [], []
    for analysis in manifest["analyses"]:
        units = [u for label, u in manifest["units"].items() if label.split("/")[0] == analysis]
        if not units:
            continue
        nav.append(f'<a href="#{analysis}">{escape(ANALYSES[analysis].title)}</a>')
        body = [f'<h2 id="{analysis}">{escape(ANALYSES[analysis].title)}</h2>',
                f"<p>{escape(HOW_TO_READ.get(analysis, ''))}</p>"]
        for unit in units:
            body += [_figure(f) for f in unit["figures"]]
            if unit["summary"]:
                body.append('<div class="notes">' + escape("\n".join(unit["summary"])) + "</div>")
        sections.append("\n".join(body))
    timing_rows = "".join(
        f"<tr><td>{escape(label)}</td><td>{u['seconds']:.1f}</td><td>{'reused' if u.get('reused') else 'computed'}</td></tr>"
        for label, u in manifest["units"].items())
    version_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in manifest["versions"].items())
    settings_rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(json.dumps(v))}</code></td></tr>"
                            for k, v in manifest["settings"].items())
    total = manifest.get("seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mechkit report: {escape(', '.join(map(display_name, manifest['models'])))}</title>
<style>{STYLE}</style></head><body>
<h1>mechkit report</h1>
<p class="muted">Models: {escape(', '.join(map(display_name, manifest['models'])))} · started {escape(manifest.get('started', ''))}
{f'· {total:.0f} s in this run' if total is not None else ''}</p>
<nav>{' '.join(nav)}</nav>
{''.join(sections)}
<h2 id="settings">Settings</h2><table>{settings_rows}</table>
<h2 id="versions">Versions</h2><table>{version_rows}</table>
<h2 id="timings">Timings</h2><table><tr><th>analysis / model</th><th>seconds</th><th></th></tr>{timing_rows}</table>
</body></html>
"""


__all__ = ["index_html"]
