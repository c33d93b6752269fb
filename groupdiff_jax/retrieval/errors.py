"""The error type the offline retrieval commands raise for bad input (a cli.UserError).

Commands catch it at the top level and print its message as a single line (no traceback): every
check that raises it runs before any work starts, so nothing has been written when it fires.
"""

from groupdiff_jax.cli import UserError


class InputError(UserError):
  """Bad input to embed/neighbors: the message says what is wrong and where, on one line."""
