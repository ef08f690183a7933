"""`modelip completion bash|zsh`: shell completion generated from the parser itself,
so it never lists a command or flag the program does not have."""

from __future__ import annotations

import argparse


def _tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
          ) -> dict[tuple[str, ...], tuple[list[str], list[str]]]:
    """command path -> (its subcommands, its flags)."""
    commands: list[str] = []
    flags: list[str] = []
    nested: dict[tuple[str, ...], tuple[list[str], list[str]]] = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                commands.append(name)
                nested.update(_tree(sub, (*path, name)))
        else:
            flags.extend(o for o in action.option_strings if o.startswith("--"))
    return {path: (sorted(commands), sorted(flags)), **nested}


def bash_script(parser: argparse.ArgumentParser) -> str:
    cases = []
    for path, (commands, flags) in sorted(_tree(parser).items()):
        key = " ".join(path)
        cases.append(f'        "{key}") commands="{" ".join(commands)}"; '
                     f'flags="{" ".join(flags)}" ;;')
    body = "\n".join(cases)
    return f'''# modelip completion for bash (zsh: `modelip completion zsh`)
# install: eval "$(modelip completion bash)"   (e.g. in ~/.bashrc)
_modelip() {{
    local cur path word commands flags
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    path=""
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$word" in
            -*) ;;
            *) _modelip_known "${{path:+$path }}$word" && path="${{path:+$path }}$word" ;;
        esac
    done
    _modelip_known "$path" || path=""
    _modelip_words "$path"
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$flags" -- "$cur") )
    elif [[ -n "$commands" ]]; then
        COMPREPLY=( $(compgen -W "$commands" -- "$cur") )
    else
        COMPREPLY=( $(compgen -f -- "$cur") )
    fi
}}
_modelip_known() {{ local commands flags; _modelip_words "$1"; [[ -n "$commands$flags" ]]; }}
_modelip_words() {{
    case "$1" in
{body}
        *) commands=""; flags="" ;;
    esac
}}
complete -o filenames -F _modelip modelip
'''


def zsh_script(parser: argparse.ArgumentParser) -> str:
    return ("# modelip completion for zsh: eval \"$(modelip completion zsh)\" in ~/.zshrc\n"
            "autoload -U +X compinit && compinit\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser))
