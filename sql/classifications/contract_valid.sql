-- A contract is valid when it is signed and today lies within its term.
-- recheck: 1h
SELECT id FROM public.contracts
WHERE signed
  AND starts_on <= current_date
  AND (ends_on IS NULL OR ends_on >= current_date)
