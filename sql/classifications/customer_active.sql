-- A customer is active when it is not deleted, has status 'active', and holds at least one
-- signed contract that is running today. The date makes membership change without any row
-- changing, hence the periodic recheck.
-- recheck: 10m
SELECT id FROM public.customers c
WHERE c.status = 'active'
  AND c.deleted_at IS NULL
  AND EXISTS (
    SELECT 1 FROM public.contracts k
    WHERE k.customer_id = c.id
      AND k.signed
      AND k.starts_on <= current_date
      AND (k.ends_on IS NULL OR k.ends_on >= current_date)
  )
