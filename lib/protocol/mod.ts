/**
 * Protocol v1: request parsing, reply styles and encoding, topics and error codes.
 *
 * @module
 */

export * from "./errors.ts";
export * from "./json_shape.ts";
export * from "./reply.ts";
export * from "./reply_style.ts";
export * from "./request.ts";
export * from "./topics.ts";
