from __future__ import annotations

import pytest

from tasks.core import config


def test_defaults_match_the_local_stack():
    s = config.load({})
    assert s.kafka.bootstrap == ["127.0.0.1:19092"]
    assert s.pg_dsn.startswith("postgresql://tapeline:")
    assert s.mongo_url == "mongodb://127.0.0.1:27117/"
    assert s.topics.partitions == 6


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"TAPELINE_PG_DSN": "mysql://x:y@h/db"}, "TAPELINE_PG_DSN"),
        ({"TAPELINE_PG_DSN": "postgresql://tapeline@127.0.0.1/db"}, "no password"),
        ({"TAPELINE_PG_DSN": "postgresql://u:p@h:notaport/db"}, "malformed port"),
        ({"TAPELINE_KAFKA_BOOTSTRAP": "localhost"}, "TAPELINE_KAFKA_BOOTSTRAP"),
        ({"TAPELINE_KAFKA_BOOTSTRAP": " , "}, "TAPELINE_KAFKA_BOOTSTRAP: empty"),
        ({"TAPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "TAPELINE_KAFKA_SASL_MECHANISM"),
        (
            {
                "TAPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "TAPELINE_KAFKA_SASL_MECHANISM": "PLAIN",
            },
            "TAPELINE_KAFKA_PASSWORD",
        ),
        ({"TAPELINE_TOPIC_PARTITIONS": "many"}, "TAPELINE_TOPIC_PARTITIONS"),
        ({"TAPELINE_MONGO_URL": "http://h/"}, "TAPELINE_MONGO_URL"),
    ],
)
def test_bad_settings_name_the_variable(env, names):
    with pytest.raises(config.ConfigError, match=names):
        config.load(env)


def test_redacts_password_in_errors():
    with pytest.raises(config.ConfigError) as e:
        config.load({"TAPELINE_PG_DSN": "postgresql://u:hunter2@h:bad/db"})
    assert "hunter2" not in str(e.value)


def test_sasl_settings_reach_the_client():
    s = config.load(
        {
            "TAPELINE_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "TAPELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "TAPELINE_KAFKA_USERNAME": "app",
            "TAPELINE_KAFKA_PASSWORD": "pw",
        }
    )
    kw = s.kafka.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_password"] == "pw"
