"""How the `taipan` command reads its arguments and explains itself: the command table's
entries, help text, did-you-mean, and parsing a command's flags (absl) apart from its
`--config.a.b=v` overrides. No jax here: `taipan --help` must answer without importing it.
"""
from __future__ import annotations

import difflib

from absl import flags

# absl's own flags every command takes.
COMMON = ("flagfile", "verbosity", "v")


class UsageError(ValueError):
  pass


class Command:
  """One subcommand: run(argv), its usage line and summary, the flags it takes, examples,
  and the words it takes besides flags (`taipan tokenizer train`). config_fields: the
  `--config.` overrides it accepts, None for any field."""

  def __init__(self, run, usage, summary, flag_names, examples, positional=(),
               config_fields=None):
    self.run, self.usage, self.summary = run, usage, summary
    self.flags, self.examples, self.positional = flag_names, examples, positional
    self.config_fields = config_fields


def overview(commands: dict[str, Command]) -> str:
  lines = ["usage: taipan <command> [--flags]   (also python -m taipan_jax.cli)", "",
           "commands:"]
  lines += [f"  {name:<10} {c.summary}" for name, c in commands.items()]
  lines += ["", "`taipan <command> --help` lists a command's flags with examples;",
            "docs/cli.md has them all."]
  return "\n".join(lines)


def command_help(commands: dict[str, Command], name: str) -> str:
  c = commands[name]
  lines = [f"usage: {c.usage}", "", c.summary + ".", "", "flags:"]
  for flag in c.flags + ("verbosity",):
    f = flags.FLAGS[flag]
    default = "" if f.default in (None, "", []) else f" (default {f.default_as_str})"
    lines.append(f"  --{flag}{default}" + (", -v" if flag == "verbosity" else ""))
    lines.append(f"      {f.help}")
  lines.append("  --flagfile=FILE")
  lines.append("      read more flags (and --config. overrides) from FILE, one a line")
  if c.config_fields is None:
    lines.append("  --config.<section>.<field>=VALUE (or --config.<section>.<field> VALUE)")
    lines.append("      override any field of configs/base.py")
  elif c.config_fields:
    lines.append(f"  --config.<field>=VALUE for {', '.join(c.config_fields)}")
  lines += ["", "examples:"] + [f"  {e}" for e in c.examples]
  return "\n".join(lines)


def closest(word: str, choices) -> str | None:
  close = difflib.get_close_matches(word, list(choices), n=1)
  return close[0] if close else None


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
  """--config.a.b=v and --config.a.b v out of args; (overrides, the rest)."""
  overrides, rest = [], []
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config."):
      if "=" not in arg and len(arg.split(None, 1)) == 2:    # a flagfile line "--config.k v"
        arg = "=".join(arg.split(None, 1))
      if "=" not in arg:
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
          raise UsageError(f"{arg} has no value; fix: write {arg}=VALUE or {arg} VALUE")
        arg = f"{arg}={args[i + 1]}"
        i += 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def parse_command(commands: dict[str, Command], name: str, prog: str,
                  args: list[str]) -> tuple[list[str], list[str]]:
  """Parses a command's flags into absl's FLAGS; returns (its --config. overrides, its
  positional arguments)."""
  command = commands[name]
  try:
    args = flags.FLAGS.read_flags_from_files(args, force_gnu=False)   # --flagfile=F
  except flags.Error as e:
    raise UsageError(f"{' '.join(str(e).split())}; fix: check the --flagfile path") from None
  overrides, args = split_overrides(args)
  try:
    positional = flags.FLAGS([prog] + args)[1:]
  except flags.Error as e:
    message = str(e).splitlines()[0].split(". Did you mean")[0]
    unknown = message.split("'")[1] if message.startswith("Unknown command line flag") else ""
    close = closest(unknown, command.flags) if unknown else None
    fix = f"did you mean --{close}?" if close else f"see `taipan {name} --help`"
    raise UsageError(f"{message}; fix: {fix}") from None
  for flag in flags.FLAGS:
    if flags.FLAGS[flag].present and flag not in command.flags + COMMON:
      owners = [n for n, c in commands.items() if flag in c.flags]
      where = f"a flag of `taipan {' / '.join(owners)}`" if owners else "not a taipan flag"
      raise UsageError(f"--{flag} is {where}, not of `taipan {name}`; fix: leave it out "
                       f"(see `taipan {name} --help`)")
  if positional != list(command.positional):
    want = " ".join(command.positional) or "no words besides its flags"
    raise UsageError(f"`taipan {name}` takes {want}, got {positional}; fix: usage: "
                     f"{command.usage}")
  return overrides, positional
