"""The file-level operations of the reference tool's commands: encrypt a program,
wrap a MEK to the cards a user names, read a program back (verify, inspect)."""
