"""Reading a course error in tests: assert its ``code`` (and ``fields``); where a test checks that the message
names the fix, it checks both languages, the Chinese and the English text together."""


def both(err: BaseException) -> str:
    """A :class:`helpers.config.TutorialError`'s Chinese and English messages, one after the other."""
    return f"{err.zh}\n{err.en}"
