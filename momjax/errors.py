"""Every error momjax raises on purpose, under one base class.

The bottom floor of the package: it imports nothing, so any module may raise these without importing
upward. Each error says what is wrong and what to do next. They are ValueErrors, since each is about a value
given to momjax (a prompt, a file, a setting). The command line maps them to one line on stderr and exit
status 2 (momjax.cli).
"""

from __future__ import annotations


class MomjaxError(ValueError):
    """Base of every error momjax raises for input it cannot use."""


class InputError(MomjaxError):
    """A prompt or a generation request that momjax cannot run as given."""


class ConfigError(MomjaxError):
    """A checkpoint's configuration asks for something momjax does not support."""


class CheckpointError(MomjaxError):
    """A checkpoint folder or file that momjax cannot load as it is; the message says what to do."""


class SessionError(InputError):
    """A session operation that cannot run as given (bad tokens, out of range, an unusable session file)."""


class TokenizerError(MomjaxError):
    """A checkpoint has no usable tokenizer, or the tokenizer cannot do what was asked."""


class TargetError(MomjaxError):
    """An unknown target name, or a GPU target without the compiler it needs installed."""
