"""The cloud side: front ends, authorization, routing, the tunnel listener, assembly."""
