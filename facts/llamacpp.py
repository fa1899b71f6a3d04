"""llama.cpp on a host: the source checkout and the ``llama-server`` binary.

pyinfra @host fact facts.llamacpp.LlamaCppCheckout path=/opt/llama.cpp
pyinfra @host fact facts.llamacpp.LlamaServerVersion path=/opt/llama.cpp/build/bin/llama-server
pyinfra @host fact facts.llamacpp.LlamaServerFlags path=/opt/llama.cpp/build/bin/llama-server
pyinfra @host fact facts.llamacpp.ServerOptions path=/opt/whisper.cpp/current/whisper-server.help
"""

from __future__ import annotations

from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox import binaries
from gpubox.quoting import shell_word


class LlamaCppCheckout(FactBase[binaries.SourceCheckout | None]):
    """
    HEAD's full sha, the uncommitted changes and the origin URL of a git checkout
    (``gpubox.binaries.SourceCheckout``); None when ``path`` has no ``.git``.
    Fails with git's message when git cannot read it (e.g. "detected dubious ownership").
    """

    @override
    def command(self, path: str) -> str:
        return binaries.checkout_command(path)

    @override
    def process(self, output: list[str]) -> binaries.SourceCheckout | None:
        try:
            return binaries.parse_checkout(output)
        except binaries.GitCheckoutError as error:
            raise FactProcessError(str(error)) from error


class LlamaServerVersion(FactBase[binaries.ServerVersion | None]):
    """
    ``llama-server --version`` of the binary at ``path`` (``gpubox.binaries.ServerVersion``);
    None when there is no file there. Fails with the binary's output when it prints no version
    (e.g. it cannot load a shared library).
    """

    @override
    def command(self, path: str) -> str:
        return binaries.server_version_command(path)

    @override
    def process(self, output: list[str]) -> binaries.ServerVersion | None:
        if not any(line.strip() for line in output):
            return None
        try:
            return binaries.parse_server_version(output)
        except ValueError as error:
            raise FactProcessError(str(error)) from error


class LlamaServerFlags(FactBase[binaries.ServerFlags | None]):
    """
    The options ``llama-server --help`` lists, every alias, and the allowed ``--spec-type`` values
    (``gpubox.binaries.ServerFlags``); None when there is no file at ``path``.
    """

    @override
    def command(self, path: str) -> str:
        return binaries.server_help_command(path)

    @override
    def process(self, output: list[str]) -> binaries.ServerFlags | None:
        if not any(line.strip() for line in output):
            return None
        flags = binaries.parse_server_help(output)
        if not flags.flags:
            raise FactProcessError("llama-server --help listed no options: " + " ".join(output[:20]))
        return flags


class ServerOptions(FactBase[binaries.ServerFlags | None]):
    """
    The options a server's saved ``--help`` lists (whisper-server's, piper's argparse usage), every
    alias (``gpubox.binaries.ServerFlags``); None when the install saved none at ``path``.
    """

    @override
    def command(self, path: str) -> str:
        return f"cat {shell_word(path)} 2>/dev/null || true"

    @override
    def process(self, output: list[str]) -> binaries.ServerFlags | None:
        if not any(line.strip() for line in output):
            return None
        flags = binaries.parse_usage_options(output)
        if not flags.flags:
            raise FactProcessError("the saved --help lists no options: " + " ".join(output[:20]))
        return flags
