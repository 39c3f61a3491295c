"""create data_keys, the table of wrapped data keys

Revision ID: 0001_data_keys
Revises:
Create Date: (first migration)

"""
from typing import Sequence, Union

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001_data_keys"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_data_keys_table()


def downgrade() -> None:
    # Dropping data_keys makes every encrypted value unreadable for good.
    op.drop_data_keys_table()
