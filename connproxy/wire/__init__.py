"""Sans-IO core of connproxy: tunnel framing, flow control, stream states and SOCKS5 parsing.

Nothing in this package imports Twisted or does I/O: bytes go in, events come out.
"""
