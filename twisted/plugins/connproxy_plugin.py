from twisted.application.service import ServiceMaker

connproxy = ServiceMaker("connproxy", "connproxy.proxy.tap", "Connectivity proxy (HTTP, SOCKS5, connector tunnels).", "connproxy")
connproxy_connector = ServiceMaker("connproxy-connector", "connproxy.connector.tap", "On-premise connector for connproxy.", "connproxy-connector")
