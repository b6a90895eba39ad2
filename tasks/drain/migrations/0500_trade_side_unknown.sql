-- A trade's side may be 'unknown' (issue 14): Finnhub's trades carry no taker side, and a
-- guessed one would be a lie in every buy/sell volume computed later. The codec accepts
-- exactly these three values (tasks.core.events.TRADE_SIDES); the column stays NOT NULL.
-- trades_side_check is the name PostgreSQL gave the column's CHECK in 0001.
ALTER TABLE trades DROP CONSTRAINT trades_side_check;
ALTER TABLE trades ADD CONSTRAINT trades_side_check CHECK (side IN ('buy', 'sell', 'unknown'));
