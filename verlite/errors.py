"""The one exception type for mistakes a user can make (bad config, bad data, bad paths).

The CLI prints it as a single line and exits with code 2; everything else is a bug and
keeps its traceback.
"""


class VerliteError(Exception):
    """A user-fixable problem. The message names the file/line/key and says what to do."""

    exit_code = 2

