"""The wire format shared by the head, the workers and the clients; imports neither side."""
