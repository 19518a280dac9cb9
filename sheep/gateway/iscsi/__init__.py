"""The iSCSI gateway (RFC 7143 target, ErrorRecoveryLevel 0): one target per VDI, LUN 0.

    wire.py        the PDU format: BHS/AHS codec, padding, CRC32C digests, encoders
    text.py        key=value text data and operational key negotiation
    login.py       the login phase: stages, CHAP (MD5, one-way and mutual)
    session.py     sessions: CmdSN window and ordering, TSIH, reinstatement, resets
    connection.py  one connection's full feature phase: Data-Out/R2T, Data-In, NOP, Text,
                   task management, logout; sans-I/O (bytes in, events and bytes out)
    sense.py       the few SCSI conditions the transport reports itself
    names.py       IQNs of exports: iqn.2026-11.io.sheep:NAME and ...:NAME:TAG
    server.py      the asyncio adapter: sockets, volumes, running SCSI commands

The SCSI block command set itself is sheep.gateway.scsi.
"""
