"""The two kinds of failure lm2 reports, and the exit codes the CLI maps them to.

`InputError` means the user gave something lm2 cannot use (a bad recipe key, a wrong artefact, a
missing file): the CLI prints one line and exits 2. `Lm2Error` is a failure while doing valid work
(exit 1). Library code raises these; only `cli.py` turns them into exit codes.
"""


class Lm2Error(Exception):
    exit_code = 1


class InputError(Lm2Error):
    exit_code = 2


class WrongArtefact(InputError):
    """An input folder exists but is not the kind of artefact the command reads."""


class NotLanded(InputError):
    """The command's capability has not been built yet."""
