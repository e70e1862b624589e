"""`cnnflow --show-completion [SHELL]` and `cnnflow --install-completion [SHELL]`.

Typer's two options are flags that detect the shell among the command's parent
processes: run outside a shell (a script, a CI step, an editor's terminal task) they
found none and printed "Shell  not supported.", and a shell named after them was
ignored. Here a shell named after either option is used as named, with no detection;
without one, the shell is detected as before, and when none is found the error says
how to name it. Typer's options stay for the help and for the completion itself
(`_CNNFLOW_COMPLETE`); this group answers them before Typer parses them.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from .errors import fail

SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")
SHOW, INSTALL = "--show-completion", "--install-completion"
HELP = {
    "show_completion": f"Print the completion script of SHELL ({', '.join(SHELLS)}), or of the shell this runs "
                       "in, to copy it or customise the installation: --show-completion [SHELL].",
    "install_completion": "Install completion for SHELL, or for the shell this runs in: --install-completion "
                          "[SHELL].",
}


def requested_shell(args: list[str], option: str, commands: list[str]) -> str | None:
    """The shell named after option among the top-level options ("" when none is named), or None when the
    option is not given. `--option NAME` and `--option=NAME` both name one; an option or a command after
    it names none."""
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            return None  # a command: what follows is its own
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option:
            following = args[i + 1] if i + 1 < len(args) else ""
            return "" if following.startswith("-") or following in commands else following
    return None


def _shell_of(option: str, named: str) -> str:
    if named:
        if named not in SHELLS:
            fail(f"{option}: unknown shell {named!r}; name one of {', '.join(SHELLS)}", 2)
        return named
    import shellingham

    try:
        detected, _ = shellingham.detect_shell()
    except shellingham.ShellDetectionFailure:
        fail(f"{option}: no shell found among this command's parent processes; name it: cnnflow {option} bash "
             f"(or {', '.join(SHELLS[1:])})", 2)
    if detected not in SHELLS:
        fail(f"{option}: this runs in {detected}, which has no completion script; name one of "
             f"{', '.join(SHELLS)}: cnnflow {option} bash", 2)
    return detected


class CompletionGroup(TyperGroup):
    """The top-level group of `cnnflow`: answers --show-completion and --install-completion itself."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if param.name in HELP:
                param.help = HELP[param.name]
        return params

    def parse_args(self, ctx, args):
        for option in (SHOW, INSTALL):
            named = requested_shell(args, option, self.list_commands(ctx))
            if named is not None:
                self._answer(ctx, option, _shell_of(option, named))
        return super().parse_args(ctx, args)

    @staticmethod
    def _answer(ctx, option: str, shell: str) -> None:
        from typer.completion import get_completion_script, install

        prog_name = ctx.find_root().info_name or "cnnflow"
        complete_var = f"_{prog_name.replace('-', '_').upper()}_COMPLETE"
        if option == SHOW:
            typer.echo(get_completion_script(prog_name=prog_name, complete_var=complete_var, shell=shell))
        else:
            shell, path = install(shell=shell, prog_name=prog_name, complete_var=complete_var)
            typer.echo(f"{shell} completion installed in {path}; it takes effect in a new terminal")
        raise typer.Exit(0)
