// Runs once, on the first start of an empty data volume (the image's entrypoint runs
// /docker-entrypoint-initdb.d as the root user). The applications connect as `tapeline`,
// which may read and write the `tapeline` database and nothing else; the root user
// (MONGO_ROOT_PASSWORD) is for administration only.
const app = db.getSiblingDB("tapeline");
if (app.getUser("tapeline") === null) {
  app.createUser({
    user: "tapeline",
    pwd: process.env.MONGO_PASSWORD,
    roles: [{ role: "readWrite", db: "tapeline" }],
  });
}
