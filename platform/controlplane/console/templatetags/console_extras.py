"""Small template helpers for the console."""

from django import template

register = template.Library()


@register.filter
def percent(used, total) -> int:
    """`used` as a whole percentage of `total`, clamped to 0..100 (0 when total is 0)."""
    try:
        return max(0, min(100, round(100 * float(used) / float(total))))
    except (TypeError, ValueError, ZeroDivisionError):
        return 0
