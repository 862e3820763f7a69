"""The small domain schemas the database scenarios run on (`psynth_jax.agents.db_scenarios`):
tables of typed columns, the SQL that creates, fills and updates them, and four domains."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Column:
  name: str
  kind: str  # int | num | text | ts
  size: int = 24  # characters, for text

  def value(self) -> str:
    """An SQL expression for a random value of this column."""
    return {
      "int": "(random() * 1000)::int",
      "num": "round((random() * 1000)::numeric, 2)",
      "text": f"substr(md5(random()::text), 1, {self.size})",
      "ts": "now() - random() * interval '365 days'",
    }[self.kind]

  def ddl(self) -> str:
    kind = {"int": "integer", "num": "numeric(10, 2)", "ts": "timestamp"}
    return f"{self.name} {kind.get(self.kind, f'varchar({self.size})')}"


@dataclasses.dataclass(frozen=True)
class Table:
  name: str
  columns: tuple[Column, ...]
  index: str = ""  # a column with an ordinary secondary index (used by the normal workload)

  def create(self) -> str:
    columns = ", ".join(c.ddl() for c in self.columns)
    return f"CREATE TABLE {self.name} (id bigserial PRIMARY KEY, {columns})"

  def insert_many(self, rows: int) -> str:
    names = ", ".join(c.name for c in self.columns)
    values = ", ".join(c.value() for c in self.columns)
    return f"INSERT INTO {self.name} ({names}) SELECT {values} FROM generate_series(1, {rows})"

  def insert_one(self) -> str:
    names = ", ".join(c.name for c in self.columns)
    return (
      f"INSERT INTO {self.name} ({names}) VALUES ({', '.join(c.value() for c in self.columns)})"
    )

  def update(self, where: str, column: int = 0) -> str:
    c = self.columns[column]
    return f"UPDATE {self.name} SET {c.name} = {c.value()} WHERE {where}"


def _table(name: str, spec: str, index: str = "") -> Table:
  """Table("plays", "user_id:int song_id:int played_at:ts") in one line."""
  return Table(name, tuple(Column(*c.split(":")) for c in spec.split()), index)


@dataclasses.dataclass(frozen=True)
class Domain:
  description: str
  tables: tuple[Table, ...]


DOMAINS: Mapping[str, Domain] = {
  "music": Domain(
    "a music streaming platform: users play songs and pay for subscriptions",
    (
      _table("users", "username:text country:text created_at:ts"),
      _table("songs", "title:text album_id:int duration:int"),
      _table("plays", "user_id:int song_id:int played_at:ts", index="user_id"),
      _table("payments", "amount:num user_id:int paid_at:ts"),
    ),
  ),
  "shop": Domain(
    "an online shop: customers order products, orders have items",
    (
      _table("customers", "name:text email:text created_at:ts"),
      _table("products", "name:text category:text price:num"),
      _table("orders", "status:text customer_id:int total:num ordered_at:ts", index="customer_id"),
      _table("order_items", "quantity:int order_id:int product_id:int"),
    ),
  ),
  "sensors": Domain(
    "an IoT platform: devices send readings, raise alerts and get maintenance",
    (
      _table("devices", "serial:text site:text installed_at:ts"),
      _table("readings", "value:num device_id:int read_at:ts", index="device_id"),
      _table("alerts", "message:text device_id:int level:int"),
      _table("maintenance", "technician:text device_id:int done_at:ts"),
    ),
  ),
  "clinic": Domain(
    "a clinic: patients book appointments with doctors and get prescriptions",
    (
      _table("patients", "name:text city:text born_at:ts"),
      _table("doctors", "name:text speciality:text hired_at:ts"),
      _table("appointments", "patient_id:int doctor_id:int starts_at:ts", index="patient_id"),
      _table("prescriptions", "drug:text patient_id:int dose:num"),
    ),
  ),
}
