"""Create the metering topics when they are missing."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


async def ensure_topics(
    bootstrap_servers: str, names: list[str], partitions: int, *, replication_factor: int = 1
) -> list[str]:
    """Create each missing topic with ``partitions`` partitions; return the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor) for name in missing]
                )
            except TopicAlreadyExistsError:
                pass  # another replica created it first
        return missing
    finally:
        await admin.close()
