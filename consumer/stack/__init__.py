"""The local stack (Postgres + pgvector, Kafka, Kafka Connect with Debezium) run without Docker."""

from consumer.stack.local import LocalStack
from consumer.stack.process import Progress, StackError

__all__ = ["LocalStack", "Progress", "StackError"]
