"""How much memory a context length needs, per policy: measured from the compiled programs (measure.py),
estimated in closed form (estimate.py), planned against a budget (plan.py), checked against this machine
(fit.py) and printed (tables.py)."""

from momjax.memory.estimate import estimate
from momjax.memory.fit import check_fits
from momjax.memory.measure import compile_program, feed_memory_report, memory_report
from momjax.memory.plan import decode_speed, max_context, plan
from momjax.memory.shapes import DEFAULT_NEW_TOKENS, abstract_cache, resolve
from momjax.memory.tables import plan_notes, plan_table
from momjax.units import format_bytes, parse_bytes

__all__ = [
    "DEFAULT_NEW_TOKENS",
    "abstract_cache",
    "check_fits",
    "compile_program",
    "decode_speed",
    "estimate",
    "feed_memory_report",
    "format_bytes",
    "max_context",
    "memory_report",
    "parse_bytes",
    "plan",
    "plan_notes",
    "plan_table",
    "resolve",
]
