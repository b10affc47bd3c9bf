"""std_web: the REST API (compatible with the 2023 std-daq REST interface), the pushed status and the web
page of one detector's pipeline. It reaches the pipeline only through the existing contracts: RabbitMQ
(std_daq.client), the services' Prometheus metrics, the live-preview stream."""
