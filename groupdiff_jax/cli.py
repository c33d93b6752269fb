"""How every `python -m groupdiff_jax.X` job starts and fails.

A user's mistake (a wrong flag, an unknown or misspelled config key, a missing config file, a bad
value, bad input data) ends the job with exactly one line on stderr,

  groupdiff_jax: error: <what is wrong, and what to do>

and exit status 2, with no traceback; a directory the failed start created (and left empty) is
removed again. Bugs still raise with their traceback.

  def main(argv): ...                      # raises cli.UserError (or a job's listed errors)
  if __name__ == '__main__':
    define_flags()
    cli.run(main, dirs=('workdir',))
"""
import difflib
import importlib.util
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

PROG = 'groupdiff_jax'
EXIT_USAGE = 2


class UserError(ValueError):
  """Bad input from the user: the message names the problem on one line."""


def fail(message: str) -> NoReturn:
  """Prints the one-line error and exits with status 2."""
  print(f'{PROG}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def one_line(exc: BaseException) -> str:
  """An exception's message on one line (unwraps ml_collections' KeyError-in-AttributeError)."""
  while exc.args and isinstance(exc.args[0], BaseException):
    exc = exc.args[0]
  text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
  return ' '.join(part.strip() for part in text.splitlines() if part.strip())


def set_dotted(config: Any, overrides: dict) -> Any:
  """Sets dotted keys ('optim.lr': 3e-4) on a ConfigDict, as --config.optim.lr=3e-4 would."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _config_flags(flag_values: flags.FlagValues) -> list[str]:
  """Names of the ml_collections config-file flags (they alone have a config_filename)."""
  return [name for name in flag_values if hasattr(type(flag_values[name]), 'config_filename')]


def _load_config(argv: Sequence[str], name: str) -> Any:
  """The config that --NAME=PATH[:ARG] names, without overrides (absl drops it on a failed parse)."""
  value = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')), '')
  path, *arg = value.split(':', 1)
  try:
    spec = importlib.util.spec_from_file_location(f'_cli_config_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*arg)
  except Exception:  # pylint: disable=broad-except  # reported by the caller's generic message
    return None


def _missing_key_message(exc: BaseException, argv: Sequence[str], config_names: list[str]) -> str:
  """"--config.optim.lrr: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"."""
  for arg in argv[1:]:
    name, _, dotted = arg.lstrip('-').split('=', 1)[0].partition('.')
    if name not in config_names or not dotted:
      continue
    node = _load_config(argv, name)
    if node is None:
      continue
    keys = dotted.split('.')
    for depth, key in enumerate(keys):
      if not hasattr(node, 'keys') or key not in node.keys():
        known = list(node.keys()) if hasattr(node, 'keys') else []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        where = '.'.join(keys[:depth])
        hint = f" (did you mean '{'.'.join(keys[:depth] + close)}'?)" if close else (
            f" ({where or 'the config'} has: {', '.join(sorted(known))})" if known else '')
        return f'--{name}.{dotted}: unknown config key {".".join(keys[:depth + 1])!r}{hint}'
      node = node[key]
  return f'unknown config key: {one_line(exc)}'


def _config_file_message(argv: Sequence[str], name: str, exc: BaseException) -> str:
  path = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')), '')
  path = path.split(':', 1)[0]
  if path and not os.path.isfile(path):
    return f'--{name}={path}: no such config file'
  cause = exc.__cause__ or exc
  return f'--{name}={path}: the config file does not load: {one_line(cause)}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure (flags and config files) as the one-line error."""
  fv = flags.FLAGS
  config_names = _config_flags(fv)
  try:
    rest = fv(argv)
  except flags.Error as e:
    required = re.search(r'Flag (--\S+) must have a value other than None', str(e))
    if 'Traceback (most recent call last)' in str(e):  # ml_collections: the config file raised;
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]  # its last line says why
      flag = re.match(r'(?:flag )?(\S+?): Error whilst parsing', lines[0])
      fail(f'{flag.group(1) if flag else "--config"}: the config file does not load: {lines[-1]}')
    fail(f'{required.group(1)} is required' if required else
         one_line(e) + (' (see --helpshort)' if 'Unknown command line flag' in str(e) else ''))
  except (KeyError, AttributeError) as e:  # ml_collections: an override of a key that is absent
    fail(_missing_key_message(e, argv, config_names))
  except OSError as e:  # an override applied to a config file that did not load
    name = next((n for n in config_names if fv[n].present), config_names[0] if config_names else '')
    fail(_config_file_message(argv, name, e) if name else one_line(e))
  except Exception as e:  # pylint: disable=broad-except  # the config file itself raised
    fail(f'the command line or config file is invalid: {type(e).__name__}: {one_line(e)}')
  for name in config_names:  # a config file is loaded lazily: make a missing one fail here
    try:
      value = fv[name].value
      if value is not None:
        getattr(value, 'keys')
    except Exception as e:  # pylint: disable=broad-except
      fail(_config_file_message(argv, name, e))
  if len(rest) > 1:
    fail(f'unexpected arguments {" ".join(rest[1:])!r} (flags are written --name=value)')
  return rest


# --- multi-process jobs (TPU pods, GPU clusters) ---------------------------------------------

def define_distributed_flags() -> None:
  """--distributed, --coordinator, --num_processes, --process_id: the same on every job."""
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host).')
  flags.DEFINE_string('coordinator', None, 'host:port of process 0 (multi-host, non-TPU).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host, non-TPU).')
  flags.DEFINE_integer('process_id', None, 'This process (multi-host, non-TPU).')


def initialize_distributed(saves_on_sigterm: bool = False) -> None:
  """jax.distributed.initialize() when --distributed is set. Cloud TPU, SLURM and OpenMPI need
  no other flag (JAX reads their environment); elsewhere pass the other three.

  jax.distributed installs a SIGTERM notifier for its preemption service, which catches the
  signal and lets the process run on. Only the trainer asks it at every step (and then saves);
  any other job (`saves_on_sigterm=False`; they resume by shards) gets the default back: SIGTERM
  stops it.
  """
  fv = flags.FLAGS
  if not fv.distributed:
    return
  import jax  # pylint: disable=import-outside-toplevel
  # CPU processes need a cross-process collectives backend (gloo is jax 0.10's default; say so
  # explicitly in case a version defaults to none). GPU and TPU ignore this setting.
  if getattr(jax.config, 'jax_cpu_collectives_implementation', 'gloo') in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
  if not saves_on_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _refuse_urls(dirs: Sequence[str]) -> None:
  """Output directories are local paths: the jobs write with os/open, not through a GCS client."""
  for name in dirs:
    value = flags.FLAGS[name].value if name in flags.FLAGS else None
    if value and '://' in value:
      fail(f'--{name}={value}: output directories must be file-system paths, not URLs; mount '
           'the bucket (gcsfuse, or the GKE Cloud Storage FUSE CSI driver) and pass the mount '
           'path, e.g. --workdir=/gcs/BUCKET/run')


def _first_missing(path: str) -> str | None:
  """The outermost directory of `path` that does not exist yet (None if `path` exists)."""
  path = os.path.abspath(path)
  missing = None
  while not os.path.exists(path):
    missing, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _remove_if_empty(path: str) -> None:
  """Removes `path` and its sub-directories when no file is below it."""
  for root, _, files in os.walk(path, topdown=False):
    if files:
      return
    try:
      os.rmdir(root)
    except OSError:
      return


def run(main: Callable[[list[str]], Any], *, dirs: Sequence[str] = ('workdir',),
        user_errors: Callable[[], tuple[type[BaseException], ...]] | None = None,
        quiet_logs: bool = True) -> None:
  """Runs `main` as a program: one-line errors for flags and for `UserError` (plus
  `user_errors()`, a callable so that heavy modules import only after flag parsing).

  dirs: flags naming output directories; one that this start created is removed again when the
  job fails with a user error and left no file in it.
  """
  def wrapped(argv: list[str]) -> None:
    fv = flags.FLAGS
    if quiet_logs and not fv['verbosity'].present:  # progress lines are print()s on stdout;
      logging.set_verbosity(logging.WARNING)        # stderr is for problems (Orbax logs INFO)
    _refuse_urls(dirs)
    new = [_first_missing(fv[d].value) for d in dirs if d in fv and fv[d].value]
    errors = (UserError,) + (tuple(user_errors()) if user_errors else ())
    try:
      main(argv)
    except errors as e:
      for path in new:
        if path:
          _remove_if_empty(path)
      fail(one_line(e))

  app.run(wrapped, flags_parser=parse_flags)
