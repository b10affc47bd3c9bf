"""writer_agent: RabbitMQ write requests in, StoreStream to std_h5_writer, request statuses out."""
