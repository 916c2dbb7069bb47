"""The status web service: a JSON API, Prometheus metrics and a status page.

Off unless ``http.listen`` names an endpoint. :mod:`camgateway.web.status`
holds the resources, :mod:`camgateway.web.service` the service that listens
once the gateway is ready; ``page.html``, ``page.js`` and ``page.css`` are
the page, served from the package (no CDN, no framework).
"""
