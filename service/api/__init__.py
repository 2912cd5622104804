"""The HTTP surface: the app, the server, middlewares, routes, request parsing, schemas and error answers."""
