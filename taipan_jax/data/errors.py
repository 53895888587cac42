"""The one exception the data layer raises for bad user input."""


class DataError(ValueError):
  """A bad data path, corpus or tokenizer; the message is one line naming the fix."""
