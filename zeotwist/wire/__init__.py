"""The zeotwist wire protocol: AMP commands, argument types and error codes.

Everything that defines what travels between client and server lives in
this package; docs/protocol.md describes it command by command.
"""
