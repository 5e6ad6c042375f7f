"""The on-premise side: dialer and reconnect, access control, TCP relay, HTTP gateway."""
